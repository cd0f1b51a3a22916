// AttentionExplorer: layer × head grid (sink score + thumbnails) → the selected head's pattern or mass.
// Python derives everything shown for a selection (pooled pattern, mass, sink keys); this module draws and
// reports clicks. The same code runs in JupyterLab (anywidget), Panel and the standalone export.

function render({ model, el }) {
  const info = model.get("info");
  const root = lensEl("div", { class: "lens-root lens-attention-explorer", "data-lm-suppress-shortcuts": "true" }); // arrows and Enter are ours, not JupyterLab's
  el.append(root);
  const tooltip = new LensTooltip(root);
  const status = lensEl("div", { class: "lens-sr", "aria-live": "polite" });
  let theme = lensTheme(root);
  let pending = null; // {t0, layer, head}: a selection made here, waiting to be drawn
  let mode = "overview"; // or "tile"
  let scale = "sqrt";
  let tileRev = 0;
  let viewCache = { dv: null, values: null }; // the decoded view, so hovering does not decode it again

  const deploy = info.attention + (info.quant ? ` + ${info.quant}` : "");
  const seqSelect = lensSequenceSelect(model, info, (s) => {
    pending = { t0: performance.now(), layer: model.get("layer"), head: model.get("head") };
    mode = "overview";
    model.set("seq", s);
    model.set("token", -1);
    model.set("query", -1);
    model.save_changes();
  });
  const lengthNote = lensEl("span", { class: "lens-subtitle" });
  root.append(
    lensEl(
      "div",
      { class: "lens-header" },
      lensEl("span", { class: "lens-title", text: `Attention — ${info.model}` }),
      lensEl("span", { class: "lens-subtitle", text: `${deploy}, ${info.n_layers} layers × ${info.n_heads} heads${info.causal ? ", causal" : ""}` }),
      seqSelect,
      lengthNote,
    ),
  );

  const grid = new LensHeadGrid({
    nLayers: info.n_layers,
    nHeads: info.n_heads,
    label: "attention heads, coloured by sink score",
    tooltip,
    describe: (l, h) => {
      const s = lensF32(model.get("scores"))[l * info.n_heads + h];
      return [`layer ${l} head ${h}`, ["sink score", lensFmt(s)], keptSet.has(l * info.n_heads + h) ? "full pattern kept" : "mass only (pattern not kept)"];
    },
    onSelect: (l, h) => select(l, h),
  });
  const keptSet = new Set(info.kept.map(([l, h]) => l * info.n_heads + h));
  const keptMarks = new Uint8Array(info.n_layers * info.n_heads);
  for (const i of keptSet) keptMarks[i] = 1;

  const gridNote = lensEl("div", {
    class: "lens-note",
    text: keptSet.size
      ? "Colour: sink score (mean attention on token 0). Bars: mass each key receives. ▲ full pattern kept."
      : "Colour: sink score (mean attention on token 0). Bars: mass each key receives. No full patterns were kept; trace with keep_patterns=[(layer, head), …] to see token × token heatmaps.",
  });
  const left = lensEl("div", { class: "lens-col" }, lensEl("div", { class: "lens-panel-title", text: "Heads" }), grid.el, lensColorbar({ cmap: "viridis", vmin: 0, vmax: 1, label: "sink score" }), gridNote);

  const detailTitle = lensEl("div", { class: "lens-panel-title" });
  const detailNote = lensEl("div", { class: "lens-note" });
  const heatmap = new LensHeatmap({
    label: "attention pattern: queries down, keys across",
    tooltip,
    onHover: (q, k) => describeCell(q, k),
    onActivate: (q, k) => activateCell(q, k),
    onEscape: () => showOverview(),
  });
  const massBars = new LensBars({
    label: "mass each key receives",
    tooltip,
    describe: (i) => describeKey(i),
    onActivate: (t) => {
      model.set("token", t);
      model.save_changes();
    },
    height: 70,
  });
  const bigBars = new LensBars({
    label: "mass each key receives (pattern not kept)",
    tooltip,
    describe: (i) => describeKey(i),
    onActivate: (t) => {
      model.set("token", t);
      model.save_changes();
    },
    height: 160,
  });
  const scaleSelect = lensEl(
    "select",
    { "aria-label": "colour scale" },
    lensEl("option", { value: "sqrt", text: "√p colour" }),
    lensEl("option", { value: "linear", text: "linear colour" }),
    lensEl("option", { value: "log", text: "log colour" }),
  );
  scaleSelect.addEventListener("change", () => {
    scale = scaleSelect.value;
    drawDetail();
  });
  const overviewButton = lensEl("button", { type: "button", text: "← overview", onclick: () => showOverview() });
  const pan = (dq, dk) => {
    const meta = model.get("tile_meta");
    if (meta && meta.nq) requestTile(meta.q0 + dq * Math.floor(meta.nq / 2), meta.k0 + dk * Math.floor(meta.nk / 2));
  };
  const panButtons = [
    lensEl("button", { type: "button", text: "↑", "aria-label": "pan up", onclick: () => pan(-1, 0) }),
    lensEl("button", { type: "button", text: "↓", "aria-label": "pan down", onclick: () => pan(1, 0) }),
    lensEl("button", { type: "button", text: "←", "aria-label": "pan left", onclick: () => pan(0, -1) }),
    lensEl("button", { type: "button", text: "→", "aria-label": "pan right", onclick: () => pan(0, 1) }),
  ];
  const tileControls = lensEl("span", { class: "lens-controls" }, overviewButton, ...panButtons);
  const controls = lensEl("div", { class: "lens-controls" }, scaleSelect, tileControls);
  const colorbarSlot = lensEl("div");
  const heatmapBox = lensEl("div", { class: "lens-col" }, controls, heatmap.el, colorbarSlot);
  const bigBarsBox = lensEl("div", { class: "lens-col" }, bigBars.el);
  const massTitle = lensEl("div", { class: "lens-panel-title", text: "Mass each key receives" });
  const right = lensEl("div", { class: "lens-col lens-detail" }, detailTitle, detailNote, heatmapBox, bigBarsBox, massTitle, massBars.el);
  root.append(lensEl("div", { class: "lens-row" }, left, right), status);

  // -- helpers ----------------------------------------------------------------------------------------
  const tokens = () => model.get("tokens") || [];
  const tokenName = (t) => {
    const toks = tokens();
    return t >= 0 && t < toks.length ? `${JSON.stringify(lensTok(toks[t])).slice(1, -1)} (#${t})` : `#${t}`;
  };
  function sinkFlags(n, block) {
    const flags = new Uint8Array(n);
    for (const k of lensI32(model.get("sink_keys"))) {
      const i = Math.floor(k / block);
      if (i < n) flags[i] = 1;
    }
    return flags;
  }
  function describeKey(i) {
    const meta = model.get("view_meta");
    const mass = lensF32(model.get("mass"));
    const b = meta.mass_block || 1;
    const rows = b > 1 ? [`keys ${i * b}–${Math.min(meta.T, (i + 1) * b) - 1} (max over ${b})`] : [`key ${tokenName(i)}`];
    rows.push(["mass received", lensFmt(mass[i])]);
    if (sinkFlags(mass.length, b)[i]) rows.push(`sink key (> ${info.tau}× the uniform share)`);
    return rows;
  }
  function currentGrid() {
    // what the heatmap shows now: the pooled overview or a full-resolution tile
    const tm = model.get("tile_meta");
    if (mode === "tile" && tm && tm.nq && tm.layer === model.get("layer") && tm.head === model.get("head") && tm.seq === model.get("seq")) {
      return { kind: "tile", q0: tm.q0, k0: tm.k0, block: 1, nq: tm.nq, nk: tm.nk, vmax: tm.vmax, values: lensF32(model.get("tile")) };
    }
    const vm = model.get("view_meta");
    if (!vm.kept) return null;
    const dv = model.get("view");
    if (viewCache.dv !== dv) viewCache = { dv, values: vm.dtype === "f16" ? lensF16(dv) : lensF32(dv) };
    const all = viewCache.values;
    const n = vm.nq * vm.nk;
    if (all.length !== 2 * n) return null; // the derived traits of this selection have not all arrived yet
    return { kind: "overview", q0: 0, k0: 0, block: vm.block, nq: vm.nq, nk: vm.nk, vmax: vm.vmax, values: all.subarray(0, n), mean: all.subarray(n, 2 * n) };
  }
  function tokenRange(start, block, T) {
    const a = start, b = Math.min(T, start + block) - 1;
    return b > a ? `${a}–${b}` : String(a);
  }
  function describeCell(q, k) {
    const g = currentGrid();
    if (!g) return [];
    const T = model.get("view_meta").T;
    const v = g.values[q * g.nk + k];
    if (g.block === 1) {
      const qt = g.q0 + q, kt = g.k0 + k;
      return [
        ["query", tokenName(qt)],
        ["key", tokenName(kt)],
        ["p", Number.isFinite(v) ? lensFmt(v, 4) : "masked (causal)"],
      ];
    }
    const qa = q * g.block, ka = k * g.block;
    return [
      ["queries", tokenRange(qa, g.block, T)],
      ["keys", tokenRange(ka, g.block, T)],
      ["max p", lensFmt(v, 4)],
      ["mean p", lensFmt(g.mean[q * g.nk + k], 4)],
      model.get("live") ? "click: zoom to full resolution" : "zoom needs a running kernel",
    ];
  }
  function requestTile(q0, k0) {
    if (!model.get("live")) return;
    tileRev += 1;
    mode = "tile";
    pending = { t0: performance.now(), layer: model.get("layer"), head: model.get("head"), tile: tileRev };
    model.set("tile_request", { q0: Math.max(0, q0), k0: Math.max(0, k0), rev: tileRev });
    model.save_changes();
    status.textContent = "loading full-resolution tile…";
  }
  function activateCell(q, k) {
    const g = currentGrid();
    if (!g) return;
    if (g.block > 1) {
      const size = info.tile_size;
      requestTile(q * g.block + Math.floor(g.block / 2) - Math.floor(size / 2), k * g.block + Math.floor(g.block / 2) - Math.floor(size / 2));
      return;
    }
    model.set("query", g.q0 + q);
    model.set("token", g.k0 + k);
    model.save_changes();
    status.textContent = `selected query ${tokenName(g.q0 + q)}, key ${tokenName(g.k0 + k)}`;
  }
  function showOverview() {
    if (mode === "overview") return;
    mode = "overview";
    drawDetail();
  }
  function select(l, h) {
    pending = { t0: performance.now(), layer: l, head: h };
    mode = "overview";
    grid.setSelected(l, h);
    model.set("layer", l);
    model.set("head", h);
    model.set("token", -1);
    model.set("query", -1);
    model.save_changes();
    // if the data for this head is already here (re-selecting it), draw now; otherwise on arrival
    drawDetail();
  }

  // -- drawing ----------------------------------------------------------------------------------------
  function drawGrid() {
    const width = Math.min(lensWidth(root, 900) * 0.42, 520);
    grid.setData({
      values: lensF32(model.get("scores")),
      cmap: "viridis",
      vmin: 0,
      vmax: 1,
      thumbs: lensF32(model.get("thumbs")),
      bins: model.get("view_meta").thumb_bins,
      marks: keptMarks,
    });
    grid.setSelected(model.get("layer"), model.get("head"));
    grid.draw(width, theme);
  }
  function drawDetail() {
    const drawStart = performance.now();
    const layer = model.get("layer"), head = model.get("head"), seq = model.get("seq");
    const vm = model.get("view_meta");
    root.dataset.layer = layer;
    root.dataset.head = head;
    root.dataset.seq = seq;
    const T = vm.T;
    lengthNote.textContent = `${(info.lengths[seq] || 0).toLocaleString()} tokens`;
    if (vm.layer !== layer || vm.head !== head || vm.seq !== seq) {
      detailTitle.textContent = `Layer ${layer} · Head ${head}`;
      detailNote.textContent = "loading…";
      root.dataset.state = "loading";
      return;
    }
    const width = lensWidth(right, Math.max(420, lensWidth(root, 900) * 0.55));
    detailTitle.textContent = `Layer ${layer} · Head ${head} — sink score ${lensFmt(vm.sink_score)}`;
    const mass = lensF32(model.get("mass"));
    massBars.setData({ values: mass, block: vm.mass_block || 1, marks: sinkFlags(mass.length, vm.mass_block || 1), selected: Math.floor(model.get("token") / (vm.mass_block || 1)), log: false });
    massBars.draw(width, theme);
    const g = currentGrid();
    if (!vm.kept) {
      mode = "overview";
      heatmapBox.hidden = true;
      bigBarsBox.hidden = false;
      massTitle.hidden = true;
      massBars.el.hidden = true;
      detailNote.replaceChildren(
        `The full pattern of this head was not kept, so this is the mass each key receives (mean attention over the queries that may attend it; sink keys in the warning colour). To see the token × token pattern, trace with `,
        lensEl("code", { text: `keep_patterns=[(${layer}, ${head})]` }),
        ` — e.g. `,
        lensEl("code", { text: `lens.trace(model, inputs, keep_patterns=[(${layer}, ${head})])` }),
        ".",
      );
      bigBars.setData({ values: mass, block: vm.mass_block || 1, marks: sinkFlags(mass.length, vm.mass_block || 1), selected: Math.floor(model.get("token") / (vm.mass_block || 1)), log: false });
      bigBars.draw(width, theme);
      root.dataset.kept = "false";
      root.dataset.mode = "mass";
    } else if (g) {
      heatmapBox.hidden = false;
      bigBarsBox.hidden = true;
      massTitle.hidden = false;
      massBars.el.hidden = false;
      const toks = tokens();
      const labels = g.block === 1 && Math.max(g.nq, g.nk) <= 96;
      const notes = [];
      if (g.kind === "tile") notes.push(`Full resolution: queries ${g.q0}–${g.q0 + g.nq - 1}, keys ${g.k0}–${g.k0 + g.nk - 1} of ${T}. Esc or “overview” to go back.`);
      else if (g.block > 1) notes.push(`${T} tokens shown as ${g.nq} × ${g.nk} blocks of ${g.block} (colour: block max). ${model.get("live") ? "Click a block to see it at full resolution." : "Zooming needs a running kernel."}`);
      else notes.push("Queries down, keys across; ▼ marks sink keys. Click a cell to select that query and key.");
      detailNote.textContent = notes.join(" ");
      const colMarks = sinkFlags(g.nk, g.block);
      if (g.kind === "tile") {
        colMarks.fill(0);
        for (const key of lensI32(model.get("sink_keys"))) if (key >= g.k0 && key < g.k0 + g.nk) colMarks[key - g.k0] = 1;
      }
      heatmap.setData({
        values: g.values,
        nq: g.nq,
        nk: g.nk,
        vmax: g.vmax || 1,
        scale,
        cmap: "viridis",
        labels,
        rowLabel: (i) => lensTok(toks[g.q0 + i]),
        colLabel: (j) => lensTok(toks[g.k0 + j]),
        rowTick: (i) => g.q0 + i * g.block,
        colTick: (j) => g.k0 + j * g.block,
        colMarks,
        maskedRgb: theme.bg2Rgb,
      });
      heatmap.draw(width, theme);
      colorbarSlot.replaceChildren(lensColorbar({ cmap: "viridis", vmin: 0, vmax: g.vmax || 1, scale, label: g.block > 1 ? "block max p" : "p" }));
      tileControls.hidden = g.kind !== "tile";
      overviewButton.disabled = g.kind !== "tile";
      root.dataset.kept = "true";
      root.dataset.mode = g.kind;
    } else {
      detailNote.textContent = "loading…";
      root.dataset.state = "loading";
      return;
    }
    root.dataset.state = "ready";
    if (pending && pending.layer === layer && pending.head === head && (!pending.tile || (model.get("tile_meta").rev === pending.tile && mode === "tile"))) {
      const ms = lensMarkRendered(root, pending.t0, drawStart);
      pending = null;
      status.textContent = `layer ${layer} head ${head} drawn in ${ms.toFixed(0)} ms`;
    }
  }
  function drawAll() {
    theme = lensTheme(root);
    drawGrid();
    drawDetail();
  }

  // Several derived traits arrive together; draw once per batch, and redraw the grid only when its data
  // changed (a large model has thousands of cells).
  let scheduled = false, gridDirty = false;
  const flush = () => {
    scheduled = false;
    if (seqSelect) seqSelect.value = String(model.get("seq"));
    if (gridDirty) {
      gridDirty = false;
      drawGrid();
    } else {
      grid.setSelected(model.get("layer"), model.get("head"));
    }
    drawDetail();
  };
  const handlers = {};
  const names = ["scores", "thumbs", "view", "view_meta", "mass", "sink_keys", "tokens", "tile", "tile_meta", "layer", "head", "seq", "token"];
  for (const name of names) {
    handlers[name] = () => {
      if (name === "scores" || name === "thumbs") gridDirty = true;
      if (!scheduled) {
        scheduled = true;
        queueMicrotask(flush);
      }
    };
    model.on(`change:${name}`, handlers[name]);
  }
  const stopRedraw = lensRedrawOn(root, drawAll);
  drawAll();
  return () => {
    for (const name of names) model.off(`change:${name}`, handlers[name]);
    stopRedraw();
  };
}

export default { render };

// CompareView: b − a deltas of lens.compare — sink-score grid, per-layer curves, output agreement, and
// the selected head's mass per token in both runs.

function render({ model, el }) {
  const info = model.get("info");
  const [labelA, labelB] = info.labels;
  const root = lensEl("div", { class: "lens-root lens-compare-view", "data-lm-suppress-shortcuts": "true" }); // arrows and Enter are ours, not JupyterLab's
  el.append(root);
  const tooltip = new LensTooltip(root);
  const status = lensEl("div", { class: "lens-sr", "aria-live": "polite" });
  let theme = lensTheme(root);
  let pending = null;
  const dmax = info.delta_max || 1;

  const badge = (name, value) => lensEl("span", { class: "lens-badge" }, `${name} `, lensEl("b", { text: value }));
  const badges = lensEl(
    "div",
    { class: "lens-badges" },
    badge("KL", info.kl === null ? "n/a" : lensFmt(info.kl, 4)),
    badge("top-1 agreement", info.top1_agreement === null ? "n/a" : `${(100 * info.top1_agreement).toFixed(1)}%`),
  );
  const seqSelect = lensSequenceSelect(model, info, (s) => {
    pending = { t0: performance.now(), layer: model.get("layer"), head: model.get("head") };
    model.set("seq", s);
    model.set("token", -1);
    model.save_changes();
  });
  root.append(
    lensEl(
      "div",
      { class: "lens-header" },
      lensEl("span", { class: "lens-title", text: `${labelB} vs ${labelA}` }),
      lensEl("span", { class: "lens-subtitle", text: `deltas are ${labelB} − ${labelA}` }),
      seqSelect,
    ),
    badges,
  );
  for (const note of info.notes || []) {
    root.append(lensEl("div", { class: "lens-note lens-warning lens-compare-note", role: "note", text: `⚠ ${note}` }));
  }
  if (info.kl === null && info.top1_agreement === null) {
    root.append(lensEl("div", { class: "lens-note", text: "KL and top-1 agreement compare next-token predictions, so they exist for language models only." }));
  }

  const grid = new LensHeadGrid({
    nLayers: info.n_layers,
    nHeads: info.n_heads,
    label: `sink score change per head, ${labelB} minus ${labelA}`,
    tooltip,
    describe: (l, h) => [`layer ${l} head ${h}`, ["Δ sink score", lensFmt(lensF32(model.get("sink_delta"))[l * info.n_heads + h], 3)]],
    onSelect: (l, h) => {
      pending = { t0: performance.now(), layer: l, head: h };
      grid.setSelected(l, h);
      model.set("layer", l);
      model.set("head", h);
      model.set("token", -1);
      model.save_changes();
      drawStrips();
    },
  });
  const charts = lensEl("div", { class: "lens-chart lens-row" });
  root.append(
    lensEl(
      "div",
      { class: "lens-row" },
      lensEl("div", { class: "lens-col" }, lensEl("div", { class: "lens-panel-title", text: "Δ sink score per head" }), grid.el, lensColorbar({ cmap: "rdbu", vmin: -dmax, vmax: dmax, label: `${labelB} − ${labelA}` })),
      lensEl("div", { class: "lens-col" }, lensEl("div", { class: "lens-panel-title", text: "Per layer" }), charts),
    ),
  );

  const stripTitle = lensEl("div", { class: "lens-panel-title" });
  const describeIn = (which) => (i) => {
    const meta = model.get("strip_meta");
    const mass = lensF32(model.get(`mass_${which}`));
    const other = lensF32(model.get(`mass_${which === "a" ? "b" : "a"}`));
    const toks = model.get(`tokens_${which}`) || [];
    const block = meta[`block_${which}`] || 1;
    const rows = block > 1 ? [`tokens ${i * block}–${(i + 1) * block - 1} (max over ${block})`] : [`${lensTok(toks[i])} (#${i})`];
    rows.push([`mass in ${which === "a" ? labelA : labelB}`, lensFmt(mass[i], 4)]);
    if (meta.same_tokens && meta.block_a === meta.block_b) rows.push([`mass in ${which === "a" ? labelB : labelA}`, lensFmt(other[i], 4)]);
    return rows;
  };
  const choose = (t) => {
    model.set("token", t);
    model.save_changes();
  };
  const barsA = new LensBars({ label: `mass each token receives in ${labelA}`, tooltip, describe: describeIn("a"), onActivate: choose, height: 60 });
  const barsB = new LensBars({ label: `mass each token receives in ${labelB}`, tooltip, describe: describeIn("b"), onActivate: choose, height: 60 });
  root.append(
    lensEl(
      "div",
      { class: "lens-col", style: { marginTop: "10px" } },
      stripTitle,
      lensEl("div", { class: "lens-subtitle", text: labelA }),
      barsA.el,
      lensEl("div", { class: "lens-subtitle", text: labelB }),
      barsB.el,
    ),
    status,
  );

  function drawCharts() {
    const series = lensF32(model.get("layer_series"));
    const X = info.n_layers + 1;
    const get = (i) => Array.from(series.subarray(i * X, (i + 1) * X));
    const width = Math.max(260, Math.min(380, (lensWidth(root, 900) - 40) / 2 - 10));
    const xTicks = lensTicks(0, info.n_layers, Math.min(info.n_layers, 6)).filter(Number.isInteger);
    const spec = [
      ["Δ normalized raw entropy", 0, { y: 0 }],
      ["Δ anisotropy p₁", 1, { y: 0 }],
      ["hidden-state cosine", 2, { y: 1 }],
      ["hidden-state relative error", 3, { y: 0 }],
    ];
    const out = [];
    for (const [title, i, ref] of spec) {
      const values = get(i);
      if (i >= 2 && !info.hidden_kept) continue;
      out.push(
        lensLineChart({ width, height: 140, title, xMin: -0.3, xMax: info.n_layers + 0.3, xTicks, series: [{ values, color: LENS_PALETTE[i % LENS_PALETTE.length], label: title }], refLines: [ref] }).svg,
      );
    }
    charts.replaceChildren(...out);
    if (!info.hidden_kept) {
      charts.append(
        lensEl("div", { class: "lens-note" }, "Hidden-state cosine and relative error need the hidden states of both runs: trace them with ", lensEl("code", { text: 'keep_hidden="all"' }), "."),
      );
    }
  }
  function drawGrid() {
    grid.setData({ values: lensF32(model.get("sink_delta")), cmap: "rdbu", vmin: -dmax, vmax: dmax });
    grid.setSelected(model.get("layer"), model.get("head"));
    grid.draw(Math.min(lensWidth(root, 900) * 0.45, 480), theme);
  }
  function drawStrips() {
    const meta = lensStripMeta(root, model, stripTitle);
    if (!meta) return;
    const layer = meta.layer, head = meta.head;
    const d = lensF32(model.get("sink_delta"))[layer * info.n_heads + head];
    stripTitle.textContent = `Layer ${layer} · Head ${head} — mass each token receives (Δ sink score ${lensFmt(d)})${meta.same_tokens ? "" : meta.T_a === meta.T_b ? " — the two runs have different tokens here" : ` — the runs have ${meta.T_a} and ${meta.T_b} tokens here`}`;
    const token = model.get("token");
    for (const [which, bars] of [["a", barsA], ["b", barsB]]) {
      const mass = lensF32(model.get(`mass_${which}`));
      const block = meta[`block_${which}`] || 1;
      const flags = new Uint8Array(mass.length);
      for (const k of lensI32(model.get(`sinks_${which}`))) if (Math.floor(k / block) < mass.length) flags[Math.floor(k / block)] = 1;
      bars.setData({ values: mass, block, marks: flags, selected: Math.floor(token / block), log: false });
      bars.draw(lensWidth(root, 800), theme);
    }
    root.dataset.state = "ready";
    if (pending && pending.layer === layer && pending.head === head) {
      lensMarkRendered(root, pending.t0);
      pending = null;
    }
  }
  function drawAll() {
    theme = lensTheme(root);
    drawGrid();
    drawCharts();
    drawStrips();
  }

  let scheduled = false;
  const schedule = () => {
    if (scheduled) return;
    scheduled = true;
    queueMicrotask(() => {
      scheduled = false;
      grid.setSelected(model.get("layer"), model.get("head"));
      if (seqSelect) seqSelect.value = String(model.get("seq"));
      drawStrips();
    });
  };
  const names = ["mass_a", "mass_b", "sinks_a", "sinks_b", "strip_meta", "tokens_a", "tokens_b", "layer", "head", "seq", "token"];
  for (const name of names) model.on(`change:${name}`, schedule);
  const stopRedraw = lensRedrawOn(root, drawAll);
  drawAll();
  return () => {
    for (const name of names) model.off(`change:${name}`, schedule);
    stopRedraw();
  };
}

export default { render };

// SinkMap: layer × head sink-score heatmap; the selected head drives a strip of the mass each token receives.

function render({ model, el }) {
  const info = model.get("info");
  const root = lensEl("div", { class: "lens-root lens-sink-map", "data-lm-suppress-shortcuts": "true" }); // arrows and Enter are ours, not JupyterLab's
  el.append(root);
  const tooltip = new LensTooltip(root);
  const status = lensEl("div", { class: "lens-sr", "aria-live": "polite" });
  let theme = lensTheme(root);
  let pending = null;

  const seqSelect = lensSequenceSelect(model, info, (s) => {
    pending = { t0: performance.now(), layer: model.get("layer"), head: model.get("head") };
    model.set("seq", s);
    model.set("token", -1);
    model.save_changes();
  });
  const metricSelect = lensEl("select", { "aria-label": "grid colour" });
  for (const [value, text] of Object.entries(info.metrics)) metricSelect.append(lensEl("option", { value, text }));
  metricSelect.value = model.get("metric");
  metricSelect.addEventListener("change", () => {
    model.set("metric", metricSelect.value);
    model.save_changes();
  });
  root.append(
    lensEl(
      "div",
      { class: "lens-header" },
      lensEl("span", { class: "lens-title", text: `Attention sinks — ${info.model}` }),
      lensEl("span", { class: "lens-subtitle", text: `${info.n_layers} layers × ${info.n_heads} heads; sink heads: score ≥ ε = ${info.epsilon} and ≥ 2× uniform; sink tokens: mass > τ = ${info.tau}× uniform (under the model's mask)` }),
      seqSelect,
      lensEl("label", { class: "lens-controls" }, "colour:", metricSelect),
    ),
  );

  const grid = new LensHeadGrid({
    nLayers: info.n_layers,
    nHeads: info.n_heads,
    label: "attention heads, coloured by sink score",
    tooltip,
    describe: (l, h) => {
      const i = l * info.n_heads + h;
      const rows = [`layer ${l} head ${h}`, [info.metrics[model.get("metric")], lensFmt(lensF32(model.get("scores"))[i])]];
      if (lensU8(model.get("outline"))[i]) rows.push(`sink head (score ≥ ${info.epsilon} and ≥ 2× uniform)`);
      return rows;
    },
    onSelect: (l, h) => {
      pending = { t0: performance.now(), layer: l, head: h };
      grid.setSelected(l, h);
      model.set("layer", l);
      model.set("head", h);
      model.set("token", -1);
      model.save_changes();
      drawStrip();
    },
  });
  const colorbarSlot = lensEl("div");
  const stripTitle = lensEl("div", { class: "lens-panel-title" });
  const describeToken = (i) => {
    const meta = model.get("strip_meta");
    const mass = lensF32(model.get("mass"));
    const toks = model.get("tokens") || [];
    const b = meta.block || 1;
    const rows = b > 1 ? [`tokens ${i * b}–${Math.min(meta.T, (i + 1) * b) - 1} (max over ${b})`] : [`${lensTok(toks[i])} (#${i})`];
    rows.push(["mass received", lensFmt(mass[i], 4)]);
    if (sinkFlags(mass.length, b)[i]) rows.push(`sink token (> ${info.tau}× uniform share)`);
    if (b === 1 && lensU8(model.get("special"))[i]) rows.push("special token");
    return rows;
  };
  const choose = (t) => {
    model.set("token", t);
    model.save_changes();
    status.textContent = `selected token ${t}`;
  };
  const chips = new LensChips({ label: "tokens, coloured by the mass they receive", tooltip, describe: describeToken, onActivate: choose });
  const bars = new LensBars({ label: "mass each token receives", tooltip, describe: describeToken, onActivate: choose, height: 110 });
  const legend = lensEl("div", { class: "lens-note", text: `Outlined: sink tokens (mass > ${info.tau}× the uniform share). Italic: special tokens.` });
  root.append(
    lensEl("div", { class: "lens-row" }, lensEl("div", { class: "lens-col" }, grid.el, colorbarSlot)),
    lensEl("div", { class: "lens-col", style: { marginTop: "10px" } }, stripTitle, chips.el, bars.el, legend),
    status,
  );

  function sinkFlags(n, block) {
    const flags = new Uint8Array(n);
    for (const k of lensI32(model.get("sink_keys"))) if (Math.floor(k / block) < n) flags[Math.floor(k / block)] = 1;
    return flags;
  }
  function drawGrid() {
    const metric = model.get("metric");
    grid.setData({ values: lensF32(model.get("scores")), cmap: "viridis", vmin: 0, vmax: 1, outline: lensU8(model.get("outline")) });
    grid.setSelected(model.get("layer"), model.get("head"));
    grid.draw(Math.min(lensWidth(root, 800), 640), theme);
    colorbarSlot.replaceChildren(lensColorbar({ cmap: "viridis", vmin: 0, vmax: 1, label: info.metrics[metric] }));
  }
  function drawStrip() {
    const meta = lensStripMeta(root, model, stripTitle);
    if (!meta) return;
    const layer = meta.layer, head = meta.head;
    stripTitle.textContent = `Layer ${layer} · Head ${head} — mass each token receives (sink score ${lensFmt(meta.score)})`;
    const mass = lensF32(model.get("mass"));
    const block = meta.block || 1;
    const flags = sinkFlags(mass.length, block);
    const token = model.get("token");
    if (block === 1 && mass.length <= info.chip_limit) {
      let peak = 0;
      for (const v of mass) peak = Math.max(peak, v);
      const special = lensU8(model.get("special"));
      const toks = model.get("tokens") || [];
      chips.setItems(
        Array.from(mass, (v, i) => ({
          text: lensTok(toks[i]),
          label: `${toks[i]}: mass ${lensFmt(v)}${flags[i] ? ", sink token" : ""}`,
          bg: lensBlend(theme.bgRgb, LENS_SEQ, Math.sqrt(v / (peak || 1))),
          sink: flags[i],
          special: special[i],
          selected: i === token,
        })),
      );
      chips.el.hidden = false;
      bars.el.hidden = true;
    } else {
      bars.setData({ values: mass, block, marks: flags, selected: Math.floor(token / block), log: false });
      bars.draw(lensWidth(root, 800), theme);
      chips.el.hidden = true;
      bars.el.hidden = false;
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
    drawStrip();
  }

  let scheduled = false, gridDirty = false;
  const handlers = {};
  const names = ["scores", "outline", "metric", "mass", "sink_keys", "strip_meta", "tokens", "layer", "head", "seq", "token"];
  for (const name of names) {
    handlers[name] = () => {
      if (name === "scores" || name === "outline" || name === "metric") gridDirty = true;
      if (scheduled) return;
      scheduled = true;
      queueMicrotask(() => {
        scheduled = false;
        if (gridDirty) {
          gridDirty = false;
          drawGrid();
        } else grid.setSelected(model.get("layer"), model.get("head"));
        metricSelect.value = model.get("metric");
        if (seqSelect) seqSelect.value = String(model.get("seq"));
        drawStrip();
      });
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

// ValleyPlot: per-layer entropy (raw, normalized, bound), anisotropy (+ bound) and first-token norm ratio
// for one or several runs, overlaid. SVG: a few hundred points at most, so vector output costs nothing.

function render({ model, el }) {
  const info = model.get("info");
  const R = info.labels.length, C = info.columns.length;
  const root = lensEl("div", { class: "lens-root lens-valley-plot", "data-lm-suppress-shortcuts": "true" }); // arrows and Enter are ours, not JupyterLab's
  el.append(root);
  const tooltip = new LensTooltip(root);
  const status = lensEl("div", { class: "lens-sr", "aria-live": "polite" });
  const visible = info.labels.map(() => true);
  const sameDepth = info.n_layers.every((n) => n === info.n_layers[0]);
  let axis = sameDepth ? "layer" : "depth";
  let cursor = null; // index into the deepest run's layers
  let pending = null;
  const deepest = Math.max(...info.n_layers);
  const col = (name) => info.columns.indexOf(name);
  const interior = (r) => !info.interior || info.interior[r];

  const legend = lensEl("div", { class: "lens-legend", role: "group", "aria-label": "runs" });
  info.labels.forEach((label, r) => {
    const button = lensEl(
      "button",
      { type: "button", "aria-pressed": "true", title: `${info.models[r]} — ${info.n_sequences[r]} sequences, ${interior(r) ? `valley at layer ${info.valley_layer[r]}` : `no interior valley (minimum at layer ${info.valley_layer[r]})`}` },
      lensEl("span", { class: "lens-swatch", style: { background: LENS_PALETTE[r % LENS_PALETTE.length] } }),
      interior(r) ? label : `${label} · no interior valley`,
    );
    button.addEventListener("click", () => {
      visible[r] = !visible[r];
      button.setAttribute("aria-pressed", String(visible[r]));
      draw();
    });
    legend.append(button);
  });
  const axisSelect = lensEl("select", { "aria-label": "x axis" }, lensEl("option", { value: "layer", text: "x: layer ℓ" }), lensEl("option", { value: "depth", text: "x: depth ℓ / L" }));
  axisSelect.value = axis;
  axisSelect.addEventListener("change", () => {
    axis = axisSelect.value;
    draw();
  });
  root.append(
    lensEl(
      "div",
      { class: "lens-header" },
      lensEl("span", { class: "lens-title", text: "Compression valley" }),
      lensEl("span", { class: "lens-subtitle", text: "solid: measured · dashed: massive-activation bound · dotted: normalized entropy" }),
      axisSelect,
    ),
    legend,
  );
  const charts = lensEl("div", { class: "lens-chart", tabindex: "0", role: "group", "aria-label": "per-layer curves; left and right arrows move the layer cursor, Enter selects the layer" });
  root.append(charts, status);

  function values(r, name) {
    const series = lensF32(model.get("series"));
    const X = series.length / (R * C);
    const j = col(name);
    return Array.from(series.subarray((r * C + j) * X, (r * C + j) * X + info.n_layers[r] + 1));
  }
  const xOf = (r, layer) => (axis === "depth" ? layer / (info.n_layers[r] || 1) : layer);
  const layerAt = (r, c) => (axis === "depth" ? Math.round((c / (deepest || 1)) * info.n_layers[r]) : c <= info.n_layers[r] ? c : null);

  let panels = [];
  function draw() {
    const width = Math.max(320, Math.min(760, lensWidth(root, 760) - 16));
    const xMax = axis === "depth" ? 1 : deepest;
    const xTicks = axis === "depth" ? [0, 0.25, 0.5, 0.75, 1] : lensTicks(0, deepest, Math.min(deepest, 12)).filter(Number.isInteger);
    const xFmt = axis === "depth" ? (v) => v.toFixed(2) : String;
    const specs = [
      { title: "matrix entropy ÷ log min(T, d)", lines: [["entropy_raw_normalized", null, "raw entropy"], ["entropy_normalized_normalized", "1 3", "normalized entropy"], ["entropy_upper_bound_normalized", "6 4", "bound on raw entropy"]], valley: true },
      { title: "anisotropy p₁", lines: [["anisotropy", null, "anisotropy"], ["anisotropy_lower_bound", "6 4", "lower bound"]] },
      { title: "first-token norm ÷ median token norm (log)", lines: [["first_norm_ratio", null, "first-token norm ratio"]], log: true },
    ];
    panels = specs.map((spec) => {
      const series = [], shades = [], vlines = [];
      for (let r = 0; r < R; r++) {
        if (!visible[r]) continue;
        const color = LENS_PALETTE[r % LENS_PALETTE.length];
        const xs = Array.from({ length: info.n_layers[r] + 1 }, (_, l) => xOf(r, l));
        for (const [name, dash, label] of spec.lines) series.push({ values: values(r, name), xs, color, dash, opacity: dash ? 0.75 : 1, label: `${info.labels[r]}: ${label}` });
        if (spec.valley && interior(r)) {
          const [lo, hi] = info.valley_range[r];
          shades.push({ x0: xOf(r, lo - 0.4), x1: xOf(r, hi + 0.4), color });
          vlines.push({ x: xOf(r, info.valley_layer[r]), color });
        }
      }
      return lensLineChart({ width, height: 170, title: spec.title, xMin: axis === "depth" ? -0.02 : -0.3, xMax: xMax + (axis === "depth" ? 0.02 : 0.3), xTicks, xFmt, yLog: !!spec.log, series, shades, vlines, refLines: spec.log ? [{ y: 1 }] : [] });
    });
    charts.replaceChildren(...panels.map((p) => p.svg));
    const xLabel = lensEl("div", { class: "lens-note", text: axis === "depth" ? "relative depth ℓ / L (0 = embeddings, 1 = last block output)" : "residual layer ℓ (0 = embeddings, L = last block output)" });
    charts.append(xLabel);
    for (const p of panels) {
      p.svg.addEventListener("mousemove", (e) => hover(p, e));
      p.svg.addEventListener("mouseleave", () => {
        tooltip.hide();
        setCursor(model.get("layer") >= 0 ? model.get("layer") : null);
      });
      p.svg.addEventListener("click", (e) => choose(nearest(p, e)));
    }
    setCursor(cursor);
    root.dataset.layer = model.get("layer");
  }
  function nearest(panel, e) {
    const r = panel.svg.getBoundingClientRect();
    const xv = panel.invert(e.clientX - r.left);
    const c = axis === "depth" ? Math.round(xv * deepest) : Math.round(xv);
    return Math.max(0, Math.min(deepest, c));
  }
  function describe(c) {
    const rows = [axis === "depth" ? `depth ${(c / (deepest || 1)).toFixed(2)}` : `layer ${c}`];
    for (let r = 0; r < R; r++) {
      if (!visible[r]) continue;
      const l = layerAt(r, c);
      if (l === null) continue;
      const v = (name) => lensFmt(values(r, name)[l]);
      rows.push(`${info.labels[r]} (layer ${l})`);
      rows.push(["  entropy / bound", `${v("entropy_raw_normalized")} / ${v("entropy_upper_bound_normalized")}`]);
      rows.push(["  normalized entropy", v("entropy_normalized_normalized")]);
      rows.push(["  anisotropy / bound", `${v("anisotropy")} / ${v("anisotropy_lower_bound")}`]);
      rows.push(["  first-token norm ratio", v("first_norm_ratio")]);
    }
    return rows;
  }
  function setCursor(c) {
    cursor = c;
    for (const p of panels) p.setCursor(c === null ? null : axis === "depth" ? c / (deepest || 1) : c);
  }
  function hover(panel, e) {
    const c = nearest(panel, e);
    setCursor(c);
    tooltip.show(e.clientX, e.clientY, describe(c));
  }
  function choose(c) {
    pending = { t0: performance.now(), layer: c };
    model.set("layer", c);
    model.save_changes();
    setCursor(c);
    status.textContent = `selected layer ${c}`;
  }
  charts.addEventListener("keydown", (e) => {
    let c = cursor === null ? 0 : cursor;
    if (e.key === "ArrowLeft") c = Math.max(0, c - 1);
    else if (e.key === "ArrowRight") c = Math.min(deepest, c + 1);
    else if (e.key === "Home") c = 0;
    else if (e.key === "End") c = deepest;
    else if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      choose(c);
      return;
    } else return;
    e.preventDefault();
    setCursor(c);
    const svg = panels[0].svg, r = svg.getBoundingClientRect();
    tooltip.show(r.left + panels[0].x(axis === "depth" ? c / (deepest || 1) : c), r.top + 30, describe(c));
  });
  charts.addEventListener("blur", () => tooltip.hide());

  const onLayer = () => {
    const l = model.get("layer");
    setCursor(l >= 0 ? l : null);
    root.dataset.layer = l;
    if (pending && pending.layer === l) {
      lensMarkRendered(root, pending.t0);
      pending = null;
    }
  };
  const redraw = () => draw();
  model.on("change:layer", onLayer);
  model.on("change:series", redraw);
  const stopRedraw = lensRedrawOn(root, redraw, draw);
  if (model.get("layer") >= 0) cursor = model.get("layer");
  draw();
  return () => {
    model.off("change:layer", onLayer);
    model.off("change:series", redraw);
    stopRedraw();
  };
}

export default { render };

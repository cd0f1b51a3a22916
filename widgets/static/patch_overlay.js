// PatchOverlay: the image a vision-language model saw, its token (or encoder patch) grid coloured by a statistic.

function render({ model, el }) {
  const info = model.get("info");
  const live = model.get("live");
  const root = lensEl("div", { class: "lens-root lens-patch-overlay", "data-lm-suppress-shortcuts": "true" });
  el.append(root);
  const tooltip = new LensTooltip(root);
  const status = lensEl("div", { class: "lens-sr", "aria-live": "polite" });
  let theme = lensTheme(root);
  let pending = null;
  let opacity = 0.6;

  const send = (changes, t0) => {
    pending = { t0: t0 || performance.now(), key: JSON.stringify(changes) };
    for (const [k, v] of Object.entries(changes)) model.set(k, v);
    model.save_changes();
  };
  const option = (value, text) => lensEl("option", { value: String(value), text });

  // -- controls --------------------------------------------------------------------------------------------
  const imageSelect = lensEl("select", { "aria-label": "image and tile" });
  info.images.forEach((img, i) =>
    img.tiles.forEach((t) => imageSelect.append(option(`${i}:${t.tile}`, `image ${i}` + (img.tiles.length > 1 ? ` · tile ${t.tile} (${t.role})` : "")))),
  );
  imageSelect.addEventListener("change", () => {
    const [i, t] = imageSelect.value.split(":").map(Number);
    const spec = info.stats[model.get("stat")];
    const q = spec.query ? defaultQuery(i) : -1;
    send({ image: i, tile: t, query: q, patch: -1 });
  });
  const statSelect = lensEl("select", { "aria-label": "statistic" });
  for (const [name, spec] of Object.entries(info.stats)) statSelect.append(option(name, spec.label));
  statSelect.addEventListener("change", () => {
    const stat = statSelect.value, spec = info.stats[stat];
    send({
      stat,
      layer: Math.min(model.get("layer"), spec.layers - 1),
      head: spec.head && live ? model.get("head") : -1,
      query: spec.query ? (model.get("query") >= 0 ? model.get("query") : defaultQuery(model.get("image"))) : -1,
      neuron: spec.neuron ? Math.max(0, model.get("neuron")) : -1,
    });
  });
  const layerSlider = lensEl("input", { type: "range", min: "0", step: "1", "aria-label": "layer" });
  const layerLabel = lensEl("span", { class: "lens-layer-label" });
  layerSlider.addEventListener("input", () => send({ layer: Number(layerSlider.value) }));
  const headSelect = lensEl("select", { "aria-label": "head" });
  headSelect.addEventListener("change", () => send({ head: Number(headSelect.value) }));
  const querySelect = lensEl("select", { "aria-label": "text token" });
  querySelect.addEventListener("change", () => send({ query: Number(querySelect.value) }));
  const neuronSelect = lensEl("select", { "aria-label": "neuron" });
  info.neurons.forEach(([l, n], i) => neuronSelect.append(option(i, `L${l} N${n}`)));
  neuronSelect.addEventListener("change", () => send({ neuron: Number(neuronSelect.value) }));
  const opacitySlider = lensEl("input", { type: "range", min: "0", max: "100", value: String(opacity * 100), "aria-label": "overlay opacity" });
  opacitySlider.addEventListener("input", () => {
    opacity = Number(opacitySlider.value) / 100;
    drawImage();
  });

  function defaultQuery(image) {
    const qs = info.queries[String(info.images[image].sequence)] || [];
    return qs.length ? qs[qs.length - 1][0] : -1;
  }

  root.append(
    lensEl("div", { class: "lens-header" },
      lensEl("span", { class: "lens-title", text: `Image patches — ${info.model}` }),
      lensEl("span", { class: "lens-subtitle", text: "outlined: sink tokens (mass > 5× uniform), visual sinks (φ ≥ " + info.tau + "), high-norm encoder patches (> " + info.norm_ratio + "× median)" })),
    lensEl("div", { class: "lens-controls" },
      imageSelect, lensEl("label", { class: "lens-controls" }, "colour:", statSelect),
      lensEl("label", { class: "lens-controls" }, "layer", layerSlider, layerLabel),
      headSelect, querySelect, neuronSelect,
      lensEl("label", { class: "lens-controls" }, "opacity", opacitySlider)),
  );
  const canvas = lensEl("canvas", { tabindex: "0", role: "grid", "aria-label": "image patches; arrows move, Enter selects", class: "lens-patch-canvas" });
  const colorbarSlot = lensEl("div");
  const detail = lensEl("div", { class: "lens-note lens-patch-detail", text: "Click a patch for its token's details." });
  const note = lensEl("div", { class: "lens-note" });
  root.append(lensEl("div", { class: "lens-row" }, lensEl("div", { class: "lens-col" }, canvas, colorbarSlot), lensEl("div", { class: "lens-col" }, detail, note)), status);

  // -- drawing ---------------------------------------------------------------------------------------------
  let focus = -1, geometry = null;
  function syncControls() {
    const stat = model.get("stat"), spec = info.stats[stat];
    statSelect.value = stat;
    imageSelect.value = `${model.get("image")}:${model.get("tile")}`;
    layerSlider.max = String(spec.layers - 1);
    layerSlider.value = String(model.get("layer"));
    layerLabel.textContent = `${model.get("layer")} / ${spec.layers - 1}`;
    const nHeads = stat === "encoder_mass" ? info.vision_heads : info.n_heads;
    headSelect.replaceChildren(option(-1, "mean over heads"), ...Array.from({ length: nHeads }, (_, h) => option(h, `head ${h}`)));
    headSelect.value = String(model.get("head"));
    headSelect.hidden = !spec.head;
    headSelect.disabled = !live;
    const qs = info.queries[String(info.images[model.get("image")].sequence)] || [];
    querySelect.replaceChildren(...qs.map(([q, label]) => option(q, `#${q} ${lensTok(label)}`)));
    querySelect.value = String(model.get("query"));
    querySelect.hidden = !spec.query;
    neuronSelect.hidden = !spec.neuron;
    neuronSelect.value = String(model.get("neuron"));
  }
  function current() {
    const meta = model.get("grid_meta");
    for (const k of ["image", "tile", "stat", "layer", "head", "query", "neuron"]) {
      if (meta[k] !== model.get(k)) return null;
    }
    return meta;
  }
  function drawImage() {
    theme = lensTheme(root);
    const meta = current();
    root.dataset.stat = model.get("stat");
    root.dataset.layer = model.get("layer");
    if (!meta) {
      root.dataset.state = live ? "loading" : "missing";
      note.textContent = live ? "loading…" : "this selection is not in the exported file (heads: mean only)";
      return;
    }
    note.textContent = "";
    const t0 = performance.now();
    const side = Math.min(lensWidth(root, 480) - 24, 420);
    const scale = side / Math.max(meta.width, meta.height);
    const w = Math.round(meta.width * scale), h = Math.round(meta.height * scale);
    const ctx = lensSizeCanvas(canvas, w, h);
    const src = document.createElement("canvas");
    src.width = meta.width;
    src.height = meta.height;
    const rgb = lensU8(model.get("pixels"));
    const img = src.getContext("2d").createImageData(meta.width, meta.height);
    for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
      img.data[j] = rgb[i];
      img.data[j + 1] = rgb[i + 1];
      img.data[j + 2] = rgb[i + 2];
      img.data[j + 3] = 255;
    }
    src.getContext("2d").putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(src, 0, 0, w, h);
    const values = lensF32(model.get("values")), flags = lensU8(model.get("flags"));
    const map = lensScale("linear", meta.vmin, meta.vmax);
    const cw = w / meta.cols, ch = h / meta.rows;
    geometry = { cw, ch, meta };
    ctx.globalAlpha = opacity;
    for (let i = 0; i < values.length; i++) {
      if (!Number.isFinite(values[i])) continue;
      ctx.fillStyle = lensCss(lensRgbAt("viridis", map(values[i])));
      ctx.fillRect((i % meta.cols) * cw, Math.floor(i / meta.cols) * ch, cw, ch);
    }
    ctx.globalAlpha = 1;
    ctx.strokeStyle = "rgba(255,255,255,0.35)";
    ctx.lineWidth = 1;
    for (let c = 1; c < meta.cols; c++) ctx.strokeRect(c * cw, 0, 0, h);
    for (let r = 1; r < meta.rows; r++) ctx.strokeRect(0, r * ch, w, 0);
    ctx.lineWidth = 2.5;
    ctx.strokeStyle = "#ff4136";
    for (let i = 0; i < flags.length; i++) if (flags[i]) ctx.strokeRect((i % meta.cols) * cw + 1.5, Math.floor(i / meta.cols) * ch + 1.5, cw - 3, ch - 3);
    const selected = model.get("patch");
    for (const [i, colour] of [[focus, theme.fg || "#000"], [selected, "#ffffff"]]) {
      if (i < 0 || i >= values.length) continue;
      ctx.strokeStyle = colour;
      ctx.lineWidth = 2;
      ctx.strokeRect((i % meta.cols) * cw + 1, Math.floor(i / meta.cols) * ch + 1, cw - 2, ch - 2);
    }
    colorbarSlot.replaceChildren(lensColorbar({ cmap: "viridis", vmin: meta.vmin, vmax: meta.vmax, label: meta.label }));
    describe(selected);
    root.dataset.state = "ready";
    if (pending) {
      lensMarkRendered(root, pending.t0, t0);
      pending = null;
    }
  }
  function cellRows(i) {
    const meta = geometry.meta;
    const values = lensF32(model.get("values")), tokens = lensI32(model.get("cell_tokens"));
    const details = lensF32(model.get("details"));
    const k = meta.detail_names.length;
    const grid = info.stats[meta.stat].grid === "patch" ? "encoder patch" : "image token";
    const rows = [`${grid} row ${Math.floor(i / meta.cols)}, col ${i % meta.cols}` + (tokens[i] >= 0 ? (grid === "image token" ? ` · token #${tokens[i]}` : ` · vision token ${tokens[i]}`) : " · no token")];
    rows.push([meta.label, lensFmt(values[i], 4)]);
    meta.detail_names.forEach((name, j) => rows.push([name, lensFmt(details[i * k + j], 4)]));
    if (lensU8(model.get("flags"))[i]) rows.push("outlined (flagged)");
    return rows;
  }
  function describe(i) {
    if (!geometry || i < 0 || i >= geometry.meta.rows * geometry.meta.cols) {
      detail.textContent = "Click a patch for its token's details.";
      return;
    }
    detail.replaceChildren(...cellRows(i).map((r) => lensEl("div", { text: Array.isArray(r) ? `${r[0]}: ${r[1]}` : r })));
  }
  function cellAt(ev) {
    if (!geometry) return -1;
    const box = canvas.getBoundingClientRect();
    const c = Math.floor((ev.clientX - box.left) / geometry.cw), r = Math.floor((ev.clientY - box.top) / geometry.ch);
    if (c < 0 || r < 0 || c >= geometry.meta.cols || r >= geometry.meta.rows) return -1;
    return r * geometry.meta.cols + c;
  }
  const choose = (i) => {
    model.set("patch", i);
    model.save_changes();
    status.textContent = `selected patch ${i}`;
    drawImage();
  };
  canvas.addEventListener("click", (ev) => {
    const i = cellAt(ev);
    if (i >= 0) {
      focus = i;
      choose(i);
    }
  });
  canvas.addEventListener("mousemove", (ev) => {
    const i = cellAt(ev);
    if (i < 0) return tooltip.hide();
    tooltip.show(ev.clientX, ev.clientY, cellRows(i));
  });
  canvas.addEventListener("mouseleave", () => tooltip.hide());
  canvas.addEventListener("keydown", (ev) => {
    if (!geometry) return;
    const { rows, cols } = geometry.meta;
    if (focus < 0) focus = Math.max(0, model.get("patch"));
    const moves = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -cols, ArrowDown: cols };
    if (ev.key in moves) {
      focus = Math.min(rows * cols - 1, Math.max(0, focus + moves[ev.key]));
      ev.preventDefault();
      drawImage();
      describe(focus);
    } else if (ev.key === "Enter" || ev.key === " ") {
      ev.preventDefault();
      choose(focus);
    }
  });

  const names = ["grid_meta", "values", "flags", "pixels", "image", "tile", "stat", "layer", "head", "query", "neuron", "patch"];
  let scheduled = false;
  const handler = () => {
    if (scheduled) return;
    scheduled = true;
    queueMicrotask(() => {
      scheduled = false;
      syncControls();
      drawImage();
    });
  };
  for (const name of names) model.on(`change:${name}`, handler);
  const stopRedraw = lensRedrawOn(root, drawImage);
  syncControls();
  drawImage();
  return () => {
    for (const name of names) model.off(`change:${name}`, handler);
    stopRedraw();
  };
}

export default { render };

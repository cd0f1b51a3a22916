// TokenView: the text of a sequence, each token's background coloured by a value, with a value scale.
// Long sequences are paged (info.page_size tokens at a time) with an overview strip of the whole sequence.

function render({ model, el }) {
  const info = model.get("info");
  const root = lensEl("div", { class: "lens-root lens-token-view", "data-lm-suppress-shortcuts": "true" }); // arrows and Enter are ours, not JupyterLab's
  el.append(root);
  const tooltip = new LensTooltip(root);
  const status = lensEl("div", { class: "lens-sr", "aria-live": "polite" });
  let theme = lensTheme(root);
  let page = 0;
  let pending = null;
  const scale = { diverging: info.diverging, vmin: info.vmin, vmax: info.vmax };

  const seqSelect = lensSequenceSelect(model, info, (s) => {
    pending = { t0: performance.now(), seq: s };
    page = 0;
    model.set("seq", s);
    model.set("token", -1);
    model.save_changes();
  });
  const scaleSlot = lensEl("div");
  root.append(
    lensEl(
      "div",
      { class: "lens-header" },
      lensEl("span", { class: "lens-title", text: info.label }),
      lensEl("span", { class: "lens-subtitle", text: info.model }),
      seqSelect,
      scaleSlot,
    ),
  );

  const describe = (i) => {
    const toks = model.get("tokens") || [];
    const v = lensF32(model.get("values"))[i];
    const rows = [`${lensTok(toks[i])} (#${i})`, [info.label, lensFmt(v, 4)]];
    if (lensU8(model.get("special"))[i]) rows.push("special token");
    return rows;
  };
  const choose = (i) => {
    model.set("token", i);
    model.save_changes();
    status.textContent = `selected token ${i}`;
  };
  const chips = new LensChips({ label: `text coloured by ${info.label}`, tooltip, describe, onActivate: choose, text: true });
  const pageLabel = lensEl("span", { class: "lens-subtitle" });
  const prev = lensEl("button", { type: "button", text: "‹ previous", onclick: () => turn(-1) });
  const next = lensEl("button", { type: "button", text: "next ›", onclick: () => turn(1) });
  const pager = lensEl("div", { class: "lens-controls" }, prev, pageLabel, next);
  const overview = new LensBars({
    label: `|${info.label}| over the whole sequence; click to jump`,
    tooltip,
    describe: (i) => describe(i),
    onActivate: (t) => {
      page = Math.floor(t / info.page_size);
      choose(t);
      draw();
    },
    height: 36,
  });
  const overviewBox = lensEl("div", { class: "lens-col" }, lensEl("div", { class: "lens-note", text: `Whole sequence (|${info.label}|, max per pixel) — click to jump there` }), overview.el, pager);
  root.append(overviewBox, chips.el, status);

  function turn(step) {
    const T = lensF32(model.get("values")).length;
    page = Math.max(0, Math.min(Math.ceil(T / info.page_size) - 1, page + step));
    draw();
  }
  function draw() {
    theme = lensTheme(root);
    const values = lensF32(model.get("values"));
    const toks = model.get("tokens") || [];
    const display = model.get("display") || [];
    const spaces = lensU8(model.get("spaces"));
    const special = lensU8(model.get("special"));
    const T = values.length;
    const pages = Math.max(1, Math.ceil(T / info.page_size));
    page = Math.min(page, pages - 1);
    const start = page * info.page_size, end = Math.min(T, start + info.page_size);
    const token = model.get("token");
    scaleSlot.replaceChildren(lensValueBar(theme, scale, info.diverging ? "scale (0 uncoloured)" : "scale"));
    const items = [];
    for (let i = start; i < end; i++) {
      items.push({
        text: display[i] ?? lensTok(toks[i]),
        label: `${toks[i]}: ${lensFmt(values[i])}`,
        bg: lensValueColor(theme, values[i], scale),
        special: special[i],
        space: spaces[i] && i > start,
        selected: i === token,
      });
    }
    chips.setItems(items, start);
    overviewBox.hidden = pages === 1;
    if (pages > 1) {
      overview.setData({ values: values.map(Math.abs), block: 1, selected: token, log: false });
      overview.draw(lensWidth(root, 800), theme);
      pageLabel.textContent = `tokens ${start}–${end - 1} of ${T}`;
      prev.disabled = page === 0;
      next.disabled = page === pages - 1;
    }
    root.dataset.seq = model.get("seq");
    root.dataset.page = page;
    root.dataset.state = "ready";
    if (pending && pending.seq === model.get("seq")) {
      lensMarkRendered(root, pending.t0);
      pending = null;
    }
  }

  let scheduled = false;
  const schedule = () => {
    if (scheduled) return;
    scheduled = true;
    queueMicrotask(() => {
      scheduled = false;
      if (seqSelect) seqSelect.value = String(model.get("seq"));
      const token = model.get("token");
      if (token >= 0) page = Math.floor(token / info.page_size);
      draw();
    });
  };
  const names = ["values", "tokens", "display", "spaces", "special", "seq", "token"];
  for (const name of names) model.on(`change:${name}`, schedule);
  const stopTheme = lensWatchTheme(draw);
  draw();
  return () => {
    for (const name of names) model.off(`change:${name}`, schedule);
    stopTheme();
  };
}

export default { render };

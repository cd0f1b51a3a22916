// NeuronExplorer: a page of the scan's neuron table (sortable, filterable, searchable by token) and the page of
// one neuron (histogram, top-k contexts coloured by activation, quantile samples, logit effects, sink flags).
// The browser holds one table page and one neuron; Python answers every change of sort/filter/page/selection.

function render({ model, el }) {
  const info = model.get("info");
  const C = info.columns.length;
  const root = lensEl("div", { class: "lens-root lens-neuron-explorer", "data-lm-suppress-shortcuts": "true" });
  el.append(root);
  const status = lensEl("div", { class: "lens-sr", "aria-live": "polite" });
  let pending = null;
  let cursor = 0;
  const live = model.get("live");

  // -- controls -------------------------------------------------------------------------------------------
  const layerSelect = lensEl("select", { "aria-label": "layer filter", disabled: !live },
    lensEl("option", { value: "-1", text: "all layers" }),
    info.layers.map((l) => lensEl("option", { value: String(l), text: `layer ${l}` })));
  const sortSelect = lensEl("select", { "aria-label": "sort by", disabled: !live },
    info.sort_keys.map((k) => lensEl("option", { value: k, text: `sort: ${k.replace("_", " ")}` })));
  const orderButton = lensEl("button", { type: "button", class: "lens-order", disabled: !live, title: "toggle ascending / descending" });
  const searchInput = lensEl("input", { type: "search", class: "lens-search", placeholder: "token in top examples…", "aria-label": "search neurons by token", disabled: !live });
  const searchButton = lensEl("button", { type: "button", text: "search", disabled: !live });
  const prev = lensEl("button", { type: "button", text: "‹", "aria-label": "previous page", disabled: !live });
  const next = lensEl("button", { type: "button", text: "›", "aria-label": "next page", disabled: !live });
  const pageLabel = lensEl("span", { class: "lens-page" });
  root.append(
    lensEl("div", { class: "lens-header" },
      lensEl("span", { class: "lens-title", text: "Neurons" }),
      lensEl("span", { class: "lens-subtitle", text: info.summary })),
    lensEl("div", { class: "lens-controls" }, layerSelect, sortSelect, orderButton, searchInput, searchButton, prev, pageLabel, next),
  );
  const body = lensEl("div", { class: "lens-ne-body" });
  const tableBox = lensEl("div", { class: "lens-ne-table", tabindex: "0", role: "grid", "aria-label": "neurons; arrow keys move, Enter opens the neuron" });
  const pageBox = lensEl("div", { class: "lens-ne-page", "aria-live": "polite" });
  body.append(tableBox, pageBox);
  root.append(body, status);

  function send(updates) {
    if (!live) return;
    pending = { t0: performance.now() };
    for (const [k, v] of Object.entries(updates)) model.set(k, v);
    model.save_changes();
  }
  layerSelect.addEventListener("change", () => send({ layer_filter: Number(layerSelect.value), page: 0 }));
  sortSelect.addEventListener("change", () => send({ sort: sortSelect.value, page: 0 }));
  orderButton.addEventListener("click", () => send({ descending: !model.get("descending"), page: 0 }));
  const doSearch = () => send({ search: searchInput.value.replace(/␣/g, " "), page: 0 });
  searchButton.addEventListener("click", doSearch);
  searchInput.addEventListener("keydown", (e) => { if (e.key === "Enter") doSearch(); });
  prev.addEventListener("click", () => send({ page: Math.max(0, model.get("table_meta").page - 1) }));
  next.addEventListener("click", () => send({ page: model.get("table_meta").page + 1 }));

  // -- the table --------------------------------------------------------------------------------------------
  function rows() {
    const t = lensF32(model.get("table"));
    const n = Math.floor(t.length / C);
    return Array.from({ length: n }, (_, i) => Array.from(t.subarray(i * C, (i + 1) * C)));
  }
  const headers = ["layer", "neuron", "max", "mean", "std", "frac > 0", "sparsity", "top token"];
  function drawTable() {
    const meta = model.get("table_meta");
    const data = rows();
    const sel = [model.get("layer"), model.get("neuron")];
    const table = lensEl("table", { class: "lens-ne-grid" });
    table.append(lensEl("thead", {}, lensEl("tr", {}, headers.map((h, j) => {
      const key = j < C ? info.columns[j] : null;
      const sortable = key && info.sort_keys.includes(key);
      const th = lensEl("th", { scope: "col", class: sortable ? "lens-sortable" : null, "aria-sort": key === model.get("sort") ? (model.get("descending") ? "descending" : "ascending") : null }, h + (key === model.get("sort") ? (model.get("descending") ? " ▾" : " ▴") : ""));
      if (sortable && live) th.addEventListener("click", () => send(key === model.get("sort") ? { descending: !model.get("descending"), page: 0 } : { sort: key, descending: true, page: 0 }));
      return th;
    }))));
    const tbody = lensEl("tbody", {});
    data.forEach((r, i) => {
      const chosen = r[0] === sel[0] && r[1] === sel[1];
      const tr = lensEl("tr", { class: "lens-ne-row" + (i === cursor ? " lens-cursor" : ""), "aria-selected": String(chosen), dataset: { layer: String(r[0]), neuron: String(r[1]) } },
        lensEl("td", { text: String(r[0]) }), lensEl("td", { text: String(r[1]) }),
        r.slice(2).map((v) => lensEl("td", { class: "lens-num", text: lensFmt(v) })),
        lensEl("td", { class: "lens-tok", text: lensTok(meta.top ? meta.top[i] : "") }));
      tr.addEventListener("click", () => choose(i));
      tbody.append(tr);
    });
    table.append(tbody);
    tableBox.replaceChildren(table, data.length ? "" : lensEl("div", { class: "lens-note", text: meta.search ? `no neuron has ${JSON.stringify(meta.search)} in its top examples` : "no neurons" }));
    pageLabel.textContent = `page ${meta.page + 1} / ${meta.pages} · ${meta.rows} neurons`;
    prev.disabled = !live || meta.page <= 0;
    next.disabled = !live || meta.page >= meta.pages - 1;
    layerSelect.value = String(model.get("layer_filter"));
    sortSelect.value = model.get("sort");
    orderButton.textContent = model.get("descending") ? "↓ desc" : "↑ asc";
    if (document.activeElement !== searchInput) searchInput.value = model.get("search");
    root.dataset.rows = String(data.length);
    root.dataset.total = String(meta.rows);
    root.dataset.page = String(meta.page);
    root.dataset.sort = model.get("sort");
  }
  function choose(i) {
    const data = rows();
    if (!data[i]) return;
    cursor = i;
    if (!live) { // the standalone export answers only the neurons it holds: set both, then ask once
      pending = { t0: performance.now() };
    }
    send({ layer: data[i][0], neuron: data[i][1] });
    if (!live) {
      model.set("layer", data[i][0]);
      model.set("neuron", data[i][1]);
      model.save_changes();
    }
    status.textContent = `layer ${data[i][0]}, neuron ${data[i][1]}`;
  }
  tableBox.addEventListener("keydown", (e) => {
    const n = rows().length;
    if (!n) return;
    if (e.key === "ArrowDown") cursor = Math.min(n - 1, cursor + 1);
    else if (e.key === "ArrowUp") cursor = Math.max(0, cursor - 1);
    else if (e.key === "Enter" || e.key === " ") { e.preventDefault(); choose(cursor); return; }
    else return;
    e.preventDefault();
    drawTable();
  });

  // -- the neuron page --------------------------------------------------------------------------------------
  function histogram(theme, width) {
    const counts = lensF32(model.get("hist"));
    const lo = info.hist_lower, hi = info.hist_upper;
    let first = counts.findIndex((c) => c > 0), last = counts.length - 1 - [...counts].reverse().findIndex((c) => c > 0);
    if (first < 0) return lensEl("div", { class: "lens-note", text: "no tokens" });
    first = Math.max(0, first - 1); last = Math.min(counts.length - 1, last + 1);
    const n = last - first + 1, H = 120, pad = 28;
    const bw = (width - pad) / n;
    const maxLog = Math.log10(Math.max(...counts) + 1);
    const svg = lensSvg("svg", { width, height: H + 34, class: "lens-hist", role: "img", "aria-label": "activation histogram (log count)" });
    for (let i = 0; i < n; i++) {
      const b = first + i, c = counts[b];
      const h = c > 0 ? Math.max(1, (Math.log10(c + 1) / maxLog) * H) : 0;
      const zero = lo[b] === 0 && hi[b] === 0;
      const rect = lensSvg("rect", { x: pad + i * bw + 0.5, y: H - h, width: Math.max(1, bw - 1), height: h, fill: zero ? theme.muted : (lo[b] < 0 ? "#2166ac" : "#b2182b") });
      rect.append(lensSvg("title", {}, `${zero ? "exactly 0" : `[${lensFmt(lo[b])}, ${lensFmt(hi[b])})`}: ${c} tokens`));
      svg.append(rect);
    }
    svg.append(lensSvg("line", { x1: pad, x2: width, y1: H + 0.5, y2: H + 0.5, stroke: theme.border }));
    const label = (b, anchor, x) => svg.append(lensSvg("text", { x, y: H + 14, "font-size": 10, fill: theme.muted, "text-anchor": anchor }, lensFmt(lo[b] === -Infinity ? hi[b] : lo[b])));
    label(first, "start", pad);
    label(last, "end", width);
    svg.append(lensSvg("text", { x: pad, y: H + 28, "font-size": 10, fill: theme.muted }, "signed log-magnitude bins (4 per decade) · bar height: log count"));
    return svg;
  }
  function contextRow(theme, tokens, acts, centre, scale) {
    return lensEl("span", { class: "lens-chips lens-ne-context" }, tokens.map((t, j) => {
      if (t === "" && (!acts || acts[j] === null)) return null;
      const rgb = acts ? lensValueColor(theme, acts[j] === null ? NaN : acts[j], scale) : null;
      return lensEl("span", {
        class: "lens-chip" + (j === centre ? " lens-ne-centre" : ""),
        style: rgb ? { background: lensCss(rgb) } : null,
        title: acts && acts[j] !== null ? `activation ${lensFmt(acts[j])}` : "outside the window",
      }, lensTok(t));
    }));
  }
  function drawPage() {
    const d = model.get("detail");
    root.dataset.layer = String(model.get("layer"));
    root.dataset.neuron = String(model.get("neuron"));
    if (!d || d.layer === undefined) {
      pageBox.replaceChildren(lensEl("div", { class: "lens-note", text: "click a neuron to open its page" }));
      return;
    }
    const theme = lensTheme(root);
    const width = Math.max(280, Math.min(620, lensWidth(pageBox, 520) - 8));
    const s = d.stats;
    const centre = info.context[0];
    const vmax = Math.max(1e-12, ...d.examples.map((e) => Math.abs(e.value)));
    const scale = { diverging: true, vmin: -vmax, vmax };
    const examples = lensEl("ol", { class: "lens-ne-examples" }, d.examples.map((e) =>
      lensEl("li", { class: "lens-ne-example" + (e.sink ? " lens-ne-sink" : ""), dataset: { doc: String(e.doc) } },
        lensEl("span", { class: "lens-num lens-ne-value", text: lensFmt(e.value) }),
        contextRow(theme, e.tokens, e.acts, centre, scale),
        lensEl("span", { class: "lens-ne-meta", text: `doc ${e.doc}:${e.position} · mass ${lensFmt(e.mass)}` }),
        e.sink ? lensEl("span", { class: "lens-ne-badge lens-ne-badge-sink", text: "sink", title: "a sink token at this layer: it receives more than τ × its uniform share of attention" }) : null,
        e.massive >= 100 ? lensEl("span", { class: "lens-ne-badge", text: `massive ×${lensFmt(e.massive)}`, title: "max |x| of this position ÷ median |X| of the window" }) : null)));
    const groups = new Map();
    for (const sm of d.samples) {
      if (!groups.has(sm.group)) groups.set(sm.group, []);
      groups.get(sm.group).push(sm);
    }
    const samples = lensEl("div", { class: "lens-ne-samples" }, [...groups.entries()].sort((a, b) => b[0] - a[0]).map(([g, list]) => {
      const [lo, hi] = info.groups[g];
      return lensEl("div", { class: "lens-ne-group" },
        lensEl("div", { class: "lens-ne-group-label", text: `activation in [${lensFmt(lo)}, ${lensFmt(hi)})` }),
        list.map((sm) => lensEl("div", { class: "lens-ne-sample" }, lensEl("span", { class: "lens-num", text: lensFmt(sm.value) }), contextRow(theme, sm.tokens, null, centre, scale))));
    }));
    const logitList = (items, cls) => lensEl("span", { class: "lens-chips" }, items.map(([t, v]) => lensEl("span", { class: `lens-chip ${cls}`, title: lensFmt(v) }, lensTok(t))));
    const logits = d.logits && d.logits.up
      ? lensEl("div", { class: "lens-ne-logits" },
          lensEl("div", {}, lensEl("b", { text: "promotes " }), logitList(d.logits.up, "lens-ne-up")),
          lensEl("div", {}, lensEl("b", { text: "suppresses " }), logitList(d.logits.down, "lens-ne-down")))
      : lensEl("div", { class: "lens-note", text: "no logit effects (no unembedding, or not computed)" });
    pageBox.replaceChildren(
      lensEl("h3", { class: "lens-ne-title", text: `Layer ${d.layer} · neuron ${d.neuron}` }),
      lensEl("div", { class: "lens-ne-stats", text: `max ${lensFmt(s.max)} · mean ${lensFmt(s.mean)} · std ${lensFmt(s.std)} · min ${lensFmt(s.min)} · fraction > 0 ${lensFmt(s.fraction_positive)} · ${s.count} tokens` }),
      histogram(theme, width),
      lensEl("h4", { text: `Top ${d.examples.length} examples (one per document)` }), examples,
      lensEl("h4", { text: "Quantile samples" }), samples,
      lensEl("h4", { text: "Logit effects W_U·(γ ⊙ W_out[:, n])" }), logits,
    );
    root.dataset.examples = String(d.examples.length);
  }

  function draw() {
    drawTable();
    drawPage();
    root.dataset.state = "ready";
    if (pending) {
      lensMarkRendered(root, pending.t0);
      pending = null;
    }
  }
  const names = ["table", "table_meta", "hist", "detail", "layer", "neuron", "sort", "descending", "layer_filter", "search"];
  let scheduled = false;
  const redraw = () => {
    if (scheduled) return;
    scheduled = true;
    queueMicrotask(() => { scheduled = false; draw(); });
  };
  for (const n of names) model.on(`change:${n}`, redraw);
  const stopRedraw = lensRedrawOn(root, draw, draw);
  draw();
  return () => {
    for (const n of names) model.off(`change:${n}`, redraw);
    stopRedraw();
  };
}

export default { render };

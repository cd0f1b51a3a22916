// lens widgets — helpers shared by every component.
//
// lens.widgets prepends this file to each component's module text, so each component is still one
// self-contained ES module (anywidget and Panel load ESM from a blob URL, which cannot import a sibling
// file, and we ship no bundler). Nothing here is exported; each component file ends with
// `export default { render }`.
//
// Heatmaps, grids and strips are hand-written canvas code on purpose: a plotting library would either need
// a CDN (which lens never uses at render time) or add megabytes to the wheel, and the drawing needed here is
// a few hundred lines: put pixels from a Float32Array through a colour table.

const LENS_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const LENS_STOPS = {
  viridis: ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"],
  // RdBu reversed: negative = blue, positive = red (the usual reading of signed activations and deltas)
  rdbu: ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"],
};

function lensEl(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key === "style") Object.assign(el.style, value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) el.append(child);
  }
  return el;
}

// Binary traits arrive as DataView (anywidget, Panel, the standalone shim). A typed array needs an aligned
// offset; copy only when the buffer slice is not aligned.
function lensTyped(dv, Type) {
  if (!dv || !dv.byteLength) return new Type(0);
  const size = Type.BYTES_PER_ELEMENT;
  if (dv.byteOffset % size === 0) return new Type(dv.buffer, dv.byteOffset, Math.floor(dv.byteLength / size));
  return new Type(dv.buffer.slice(dv.byteOffset, dv.byteOffset + dv.byteLength));
}
const lensF32 = (dv) => lensTyped(dv, Float32Array);

// IEEE half floats → Float32Array through a 65536-entry table (Float16Array is too new to rely on).
let LENS_HALF = null;
function lensF16(dv) {
  if (!LENS_HALF) {
    LENS_HALF = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) {
      const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
      LENS_HALF[h] = exp === 0 ? sign * Math.pow(2, -14) * (frac / 1024)
        : exp === 31 ? (frac ? NaN : sign * Infinity) : sign * Math.pow(2, exp - 15) * (1 + frac / 1024);
    }
  }
  const bits = lensTyped(dv, Uint16Array);
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = LENS_HALF[bits[i]];
  return out;
}
const lensI32 = (dv) => lensTyped(dv, Int32Array);
const lensU8 = (dv) => lensTyped(dv, Uint8Array);

function lensHexRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

const LENS_LUTS = {};
function lensLut(name) {
  if (!LENS_LUTS[name]) {
    const stops = LENS_STOPS[name].map(lensHexRgb);
    const lut = new Uint8ClampedArray(256 * 3);
    for (let i = 0; i < 256; i++) {
      const t = (i / 255) * (stops.length - 1);
      const j = Math.min(Math.floor(t), stops.length - 2);
      const f = t - j;
      for (let c = 0; c < 3; c++) lut[i * 3 + c] = stops[j][c] + f * (stops[j + 1][c] - stops[j][c]);
    }
    LENS_LUTS[name] = lut;
  }
  return LENS_LUTS[name];
}

function lensRgbAt(name, t) {
  const lut = lensLut(name);
  const i = Math.max(0, Math.min(255, Math.round((Number.isFinite(t) ? t : 0) * 255))) * 3;
  return [lut[i], lut[i + 1], lut[i + 2]];
}
const lensCss = (rgb) => `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;

// A value → [0, 1] mapping. "sqrt" is the default for attention: probabilities are heavy-tailed, and a
// linear scale leaves everything but the sink black.
function lensScale(kind, vmin, vmax) {
  if (kind === "log") {
    const hi = Math.log10(Math.max(vmax, 1e-30));
    const lo = hi - 4;
    return (v) => (v > 0 ? Math.max(0, Math.min(1, (Math.log10(v) - lo) / (hi - lo))) : 0);
  }
  const span = vmax - vmin || 1;
  if (kind === "sqrt") return (v) => Math.sqrt(Math.max(0, Math.min(1, (v - vmin) / span)));
  return (v) => Math.max(0, Math.min(1, (v - vmin) / span));
}

// Theme: canvases cannot use CSS variables, so resolve them (and their JupyterLab fallbacks) at draw time.
const LENS_RGB_CACHE = new Map();
function lensParseColor(color) {
  if (LENS_RGB_CACHE.has(color)) return LENS_RGB_CACHE.get(color);
  const c = document.createElement("canvas");
  c.width = c.height = 1;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#000";
  ctx.fillStyle = color;
  ctx.fillRect(0, 0, 1, 1);
  const d = ctx.getImageData(0, 0, 1, 1).data;
  const rgb = [d[0], d[1], d[2]];
  LENS_RGB_CACHE.set(color, rgb);
  return rgb;
}
const lensLuma = (rgb) => (0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]) / 255;

function lensTheme(el) {
  const cs = getComputedStyle(el);
  const v = (name, fallback) => cs.getPropertyValue(name).trim() || fallback;
  const theme = {
    bg: v("--lens-bg", "#ffffff"),
    bg2: v("--lens-bg2", "#eef0f2"),
    fg: v("--lens-fg", "#1f2328"),
    muted: v("--lens-muted", "#5f6670"),
    border: v("--lens-border", "#c4c9cf"),
    accent: v("--lens-accent", "#1565c0"),
    sink: v("--lens-sink", "#d32f2f"),
    special: v("--lens-special", "#b26a00"),
    font: v("--lens-font", "sans-serif"),
    mono: v("--lens-mono", "monospace"),
  };
  theme.bgRgb = lensParseColor(theme.bg);
  theme.bg2Rgb = lensParseColor(theme.bg2);
  theme.dark = lensLuma(theme.bgRgb) < 0.5;
  return theme;
}

// JupyterLab switches themes by changing attributes on <body>; the standalone page follows the OS.
function lensWatchTheme(callback) {
  const observer = new MutationObserver(() => callback());
  observer.observe(document.body, { attributes: true, attributeFilter: ["data-jp-theme-light", "data-jp-theme-name", "class"] });
  const media = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;
  if (media) media.addEventListener("change", callback);
  return () => {
    observer.disconnect();
    if (media) media.removeEventListener("change", callback);
  };
}

// Shared by the views with a per-head token strip: mirror the selection into data-* attributes (the browser
// tests and CSS read them) and, while Python is still computing the strip for a new selection, show
// "loading…" instead of the previous head's data. Returns the strip's metadata, or null while loading.
function lensStripMeta(root, model, titleEl) {
  const layer = model.get("layer"), head = model.get("head"), seq = model.get("seq");
  const meta = model.get("strip_meta");
  root.dataset.layer = layer;
  root.dataset.head = head;
  root.dataset.seq = seq;
  if (meta.layer !== layer || meta.head !== head || meta.seq !== seq) {
    titleEl.textContent = `Layer ${layer} · Head ${head} — loading…`;
    root.dataset.state = "loading";
    return null;
  }
  return meta;
}

// Every component redraws when the theme changes or its width changes by more than a few pixels (a
// resize by a scrollbar's appearance would otherwise redraw in a loop). Returns the cleanup function.
function lensRedrawOn(root, onTheme, onResize = onTheme) {
  const stopTheme = lensWatchTheme(onTheme);
  let lastWidth = 0;
  const resize = new ResizeObserver(() => {
    const w = lensWidth(root, 0);
    if (Math.abs(w - lastWidth) > 8) {
      lastWidth = w;
      onResize();
    }
  });
  resize.observe(root);
  return () => {
    stopTheme();
    resize.disconnect();
  };
}

function lensFmt(v, digits = 3) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a < 1e-3 || a >= 1e5) return v.toExponential(2);
  return String(Number(v.toPrecision(digits)));
}

function lensTok(token) {
  if (token === undefined || token === null) return "";
  return String(token)
    .replace(/^[Ġ▁]/u, "␣")
    .replace(/ /g, "␣")
    .replace(/\n|Ċ/g, "↵")
    .replace(/\t/g, "⇥")
    .replace(/[\u0000-\u001f\u007f]/g, (ch) => "\\x" + ch.charCodeAt(0).toString(16).padStart(2, "0"));
}
const lensShort = (s, n = 12) => (s.length > n ? s.slice(0, n - 1) + "…" : s);

function lensSizeCanvas(canvas, width, height) {
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(width * dpr));
  canvas.height = Math.max(1, Math.round(height * dpr));
  canvas.style.width = width + "px";
  canvas.style.height = height + "px";
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return ctx;
}

// Interaction latency is measured in the page: the time from the click (or key press) that changed the
// selection to the end of the draw that shows it, recorded on the component's root element.
function lensMarkRendered(root, t0, drawStart) {
  const now = performance.now();
  const ms = now - t0;
  root.dataset.renderMs = ms.toFixed(2);
  // the draw alone (the rest is the round trip to Python and back)
  if (drawStart !== undefined) root.dataset.drawMs = (now - drawStart).toFixed(2);
  root.dataset.renderCount = String((Number(root.dataset.renderCount) || 0) + 1);
  return ms;
}

function lensWidth(el, fallback) {
  const w = el.getBoundingClientRect().width;
  return w > 40 ? w : fallback;
}

class LensTooltip {
  constructor(root) {
    this.root = root;
    this.el = lensEl("div", { class: "lens-tooltip", role: "tooltip" });
    this.el.hidden = true;
    root.append(this.el);
  }
  // rows: strings, or [key, value] pairs
  show(clientX, clientY, rows) {
    this.el.replaceChildren(
      ...rows.map((row) =>
        Array.isArray(row)
          ? lensEl("div", { class: "lens-tooltip-row" }, lensEl("span", { class: "lens-tooltip-key", text: row[0] }), lensEl("span", { class: "lens-tooltip-value", text: row[1] }))
          : lensEl("div", { text: row }),
      ),
    );
    this.el.hidden = false;
    const box = this.root.getBoundingClientRect();
    const tip = this.el.getBoundingClientRect();
    let x = clientX - box.left + this.root.scrollLeft + 14;
    let y = clientY - box.top + 14;
    if (x + tip.width > box.width + this.root.scrollLeft) x = Math.max(0, x - tip.width - 28);
    // the root scrolls horizontally (wide heatmaps), so overflowing its bottom would add a scrollbar
    if (y + tip.height > box.height) y = Math.max(0, y - tip.height - 28);
    this.el.style.left = x + "px";
    this.el.style.top = y + "px";
  }
  showAt(el, rows) {
    const r = el.getBoundingClientRect();
    this.show(r.left + r.width / 2, r.bottom - 10, rows);
  }
  hide() {
    this.el.hidden = true;
  }
}

// A colour legend: gradient plus its end values.
function lensColorbar({ cmap, vmin, vmax, scale = "linear", label = "" }) {
  const canvas = lensEl("canvas", { "aria-hidden": "true" });
  const ctx = lensSizeCanvas(canvas, 120, 10);
  const map = lensScale(scale, vmin, vmax);
  for (let x = 0; x < 120; x++) {
    const v = scale === "log" ? vmax * Math.pow(10, -4 + (4 * x) / 119) : vmin + ((vmax - vmin) * x) / 119;
    ctx.fillStyle = lensCss(lensRgbAt(cmap, map(v)));
    ctx.fillRect(x, 0, 1, 10);
  }
  const lo = scale === "log" ? vmax * 1e-4 : vmin;
  return lensEl(
    "div",
    { class: "lens-colorbar", role: "img", "aria-label": `${label}: colour from ${lensFmt(lo)} to ${lensFmt(vmax)}${scale === "linear" ? "" : `, ${scale} scale`}` },
    label ? lensEl("span", { text: label }) : null,
    lensEl("span", { text: lensFmt(lo) }),
    canvas,
    lensEl("span", { text: lensFmt(vmax) + (scale === "linear" ? "" : ` (${scale})`) }),
  );
}

// Layer × head grid: one canvas for colours and thumbnails, with a grid of focusable cells laid over it
// for the mouse, the keyboard and screen readers.
class LensHeadGrid {
  constructor({ nLayers, nHeads, label, describe, onSelect, tooltip }) {
    this.L = nLayers;
    this.H = nHeads;
    this.describe = describe;
    this.onSelect = onSelect;
    this.tooltip = tooltip;
    this.canvas = lensEl("canvas", { "aria-hidden": "true" });
    this.cells = lensEl("div", { class: "lens-headgrid-cells", role: "grid", "aria-label": label });
    this.el = lensEl("div", { class: "lens-headgrid" }, this.canvas, this.cells);
    this.cellEls = [];
    for (let l = 0; l < nLayers; l++) {
      const row = lensEl("div", { class: "lens-headgrid-row", role: "row" });
      for (let h = 0; h < nHeads; h++) {
        const cell = lensEl("div", { class: "lens-cell", role: "gridcell", tabindex: "-1", "aria-selected": "false", dataset: { layer: l, head: h } });
        row.append(cell);
        this.cellEls.push(cell);
      }
      this.cells.append(row);
    }
    this.focusIndex = 0;
    this.cellEls[0].tabIndex = 0;
    this.selectedIndex = -1;
    this.data = null;
    this.cells.addEventListener("click", (e) => {
      const cell = e.target.closest(".lens-cell");
      if (cell) this._activate(this.cellEls.indexOf(cell), e);
    });
    this.cells.addEventListener("mousemove", (e) => {
      const cell = e.target.closest(".lens-cell");
      if (!cell) return this.tooltip.hide();
      const i = this.cellEls.indexOf(cell);
      this.tooltip.show(e.clientX, e.clientY, this.describe(Math.floor(i / this.H), i % this.H));
    });
    this.cells.addEventListener("mouseleave", () => this.tooltip.hide());
    this.cells.addEventListener("focusout", () => this.tooltip.hide());
    this.cells.addEventListener("keydown", (e) => this._key(e));
  }
  _activate(i, event) {
    if (i < 0) return;
    this._focus(i, false);
    this.onSelect(Math.floor(i / this.H), i % this.H, event);
  }
  _focus(i, move = true) {
    this.cellEls[this.focusIndex].tabIndex = -1;
    this.focusIndex = i;
    const cell = this.cellEls[i];
    cell.tabIndex = 0;
    if (move) {
      cell.focus();
      this.tooltip.showAt(cell, this.describe(Math.floor(i / this.H), i % this.H));
    }
  }
  _key(e) {
    const L = this.L, H = this.H;
    let l = Math.floor(this.focusIndex / H), h = this.focusIndex % H;
    switch (e.key) {
      case "ArrowLeft": h = Math.max(0, h - 1); break;
      case "ArrowRight": h = Math.min(H - 1, h + 1); break;
      case "ArrowUp": l = Math.max(0, l - 1); break;
      case "ArrowDown": l = Math.min(L - 1, l + 1); break;
      case "Home": h = 0; if (e.ctrlKey) l = 0; break;
      case "End": h = H - 1; if (e.ctrlKey) l = L - 1; break;
      case "PageUp": l = 0; break;
      case "PageDown": l = L - 1; break;
      case "Enter":
      case " ":
        e.preventDefault();
        this._activate(this.focusIndex, e);
        return;
      default:
        return;
    }
    e.preventDefault();
    this._focus(l * H + h);
  }
  setSelected(layer, head) {
    if (this.selectedIndex >= 0) this.cellEls[this.selectedIndex].setAttribute("aria-selected", "false");
    this.selectedIndex = layer >= 0 && head >= 0 ? layer * this.H + head : -1;
    if (this.selectedIndex >= 0) {
      this.cellEls[this.selectedIndex].setAttribute("aria-selected", "true");
      if (!this.cells.contains(document.activeElement)) this._focus(this.selectedIndex, false);
    }
  }
  // data: {values: Float32Array(L*H), cmap, vmin, vmax, thumbs?: Float32Array(L*H*bins), bins?,
  //        marks?: Uint8Array(L*H) (corner triangle), outline?: Uint8Array(L*H)}
  setData(data) {
    this.data = data;
    for (let i = 0; i < this.cellEls.length; i++) {
      const desc = this.describe(Math.floor(i / this.H), i % this.H)
        .map((r) => (Array.isArray(r) ? r.join(" ") : r))
        .join(", ");
      this.cellEls[i].setAttribute("aria-label", desc);
    }
  }
  draw(maxWidth, theme) {
    if (!this.data) return;
    const { L, H } = this;
    const left = 30, top = 16;
    const cs = Math.max(8, Math.min(36, Math.floor((maxWidth - left - 4) / H)));
    const width = left + H * cs, height = top + L * cs;
    const ctx = lensSizeCanvas(this.canvas, width, height);
    Object.assign(this.cells.style, { left: left + "px", top: top + "px", gridTemplateColumns: `repeat(${H}, ${cs}px)`, gridAutoRows: cs + "px" });
    ctx.clearRect(0, 0, width, height);
    ctx.font = `10px ${theme.font}`;
    ctx.fillStyle = theme.muted;
    ctx.textAlign = "center";
    ctx.textBaseline = "bottom";
    const every = Math.max(1, Math.ceil(16 / cs));
    for (let h = 0; h < H; h += every) ctx.fillText(String(h), left + (h + 0.5) * cs, top - 3);
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    const everyL = Math.max(1, Math.ceil(12 / cs));
    for (let l = 0; l < L; l += everyL) ctx.fillText("L" + l, left - 4, top + (l + 0.5) * cs);
    const { values, cmap, vmin, vmax, thumbs, bins, marks, outline } = this.data;
    const map = lensScale("linear", vmin, vmax);
    for (let l = 0; l < L; l++) {
      for (let h = 0; h < H; h++) {
        const i = l * H + h;
        const x = left + h * cs, y = top + l * cs;
        const v = values[i];
        const rgb = Number.isFinite(v) ? lensRgbAt(cmap, map(v)) : theme.bg2Rgb;
        ctx.fillStyle = lensCss(rgb);
        ctx.fillRect(x + 0.5, y + 0.5, cs - 1, cs - 1);
        const ink = lensLuma(rgb) > 0.55 ? "rgba(0,0,0,0.7)" : "rgba(255,255,255,0.8)";
        if (thumbs && bins && cs >= 12) {
          // the thumbnail: mass each key bin receives, scaled to the head's own maximum
          let peak = 0;
          for (let b = 0; b < bins; b++) peak = Math.max(peak, thumbs[i * bins + b]);
          if (peak > 0) {
            ctx.fillStyle = ink;
            const w = (cs - 4) / bins, hmax = cs - 5;
            for (let b = 0; b < bins; b++) {
              const bh = (thumbs[i * bins + b] / peak) * hmax;
              if (bh > 0.2) ctx.fillRect(x + 2 + b * w, y + cs - 2 - bh, Math.max(0.8, w - 0.3), bh);
            }
          }
        }
        if (marks && marks[i]) {
          ctx.fillStyle = ink;
          ctx.beginPath();
          ctx.moveTo(x + cs - 1, y + 1);
          ctx.lineTo(x + cs - 1, y + 1 + Math.max(4, cs / 3));
          ctx.lineTo(x + cs - 1 - Math.max(4, cs / 3), y + 1);
          ctx.closePath();
          ctx.fill();
        }
        if (outline && outline[i]) {
          ctx.strokeStyle = theme.sink;
          ctx.lineWidth = 2;
          ctx.strokeRect(x + 1.5, y + 1.5, cs - 3, cs - 3);
        }
      }
    }
  }
}

// Token × token heatmap on a canvas: values go through a colour table into an ImageData the size of the
// data (≤ 256 × 256, pooled in Python), which is scaled up without smoothing.
class LensHeatmap {
  constructor({ label, tooltip, onHover, onActivate, onEscape }) {
    this.canvas = lensEl("canvas", { tabindex: "0", role: "img", "aria-label": label });
    this.el = lensEl("div", { class: "lens-heatmap" }, this.canvas);
    this.tooltip = tooltip;
    this.onHover = onHover;
    this.onActivate = onActivate;
    this.onEscape = onEscape;
    this.data = null;
    this.cursor = null;
    this.geom = null;
    this.canvas.addEventListener("mousemove", (e) => {
      const hit = this._hit(e);
      if (!hit) return this.tooltip.hide();
      this.tooltip.show(e.clientX, e.clientY, this.onHover(hit[0], hit[1]));
    });
    this.canvas.addEventListener("mouseleave", () => this.tooltip.hide());
    this.canvas.addEventListener("click", (e) => {
      const hit = this._hit(e);
      if (hit) {
        this.cursor = hit;
        this.onActivate(hit[0], hit[1], e);
      }
    });
    this.canvas.addEventListener("keydown", (e) => this._key(e));
    this.canvas.addEventListener("blur", () => this.tooltip.hide());
  }
  _hit(e) {
    if (!this.geom || !this.data) return null;
    const r = this.canvas.getBoundingClientRect();
    const { left, top, cw, ch } = this.geom;
    const k = Math.floor((e.clientX - r.left - left) / cw);
    const q = Math.floor((e.clientY - r.top - top) / ch);
    if (q < 0 || k < 0 || q >= this.data.nq || k >= this.data.nk) return null;
    return [q, k];
  }
  _key(e) {
    if (!this.data) return;
    const step = e.shiftKey ? 10 : 1;
    let [q, k] = this.cursor || [0, 0];
    switch (e.key) {
      case "ArrowLeft": k -= step; break;
      case "ArrowRight": k += step; break;
      case "ArrowUp": q -= step; break;
      case "ArrowDown": q += step; break;
      case "Home": k = 0; break;
      case "End": k = this.data.nk - 1; break;
      case "Enter":
      case " ":
        e.preventDefault();
        this.onActivate(q, k, e);
        return;
      case "Escape":
        if (this.onEscape) this.onEscape(e);
        return;
      default:
        return;
    }
    e.preventDefault();
    q = Math.max(0, Math.min(this.data.nq - 1, q));
    k = Math.max(0, Math.min(this.data.nk - 1, k));
    this.cursor = [q, k];
    this.redraw();
    const { left, top, cw, ch } = this.geom;
    const r = this.canvas.getBoundingClientRect();
    this.tooltip.show(r.left + left + (k + 1) * cw, r.top + top + (q + 1) * ch, this.onHover(q, k));
  }
  // data: {values: Float32Array(nq*nk), nq, nk, vmax, scale, cmap, rowLabel(i), colLabel(j), labels: bool,
  //        colMarks?: Uint8Array(nk), rowTick(i) → token index, colTick(j) → token index}
  setData(data) {
    this.data = data;
    if (this.cursor && (this.cursor[0] >= data.nq || this.cursor[1] >= data.nk)) this.cursor = null;
    const off = document.createElement("canvas");
    off.width = data.nk;
    off.height = data.nq;
    const octx = off.getContext("2d");
    const img = octx.createImageData(data.nk, data.nq);
    const px = img.data;
    const lut = lensLut(data.cmap);
    const map = lensScale(data.scale, 0, data.vmax);
    const masked = data.maskedRgb;
    const values = data.values;
    for (let i = 0, n = data.nq * data.nk; i < n; i++) {
      const v = values[i];
      const o = i * 4;
      if (v !== v) {
        // NaN: no query may attend this (block of) key(s) — causal mask
        px[o] = masked[0]; px[o + 1] = masked[1]; px[o + 2] = masked[2];
      } else {
        const j = Math.round(map(v) * 255) * 3;
        px[o] = lut[j]; px[o + 1] = lut[j + 1]; px[o + 2] = lut[j + 2];
      }
      px[o + 3] = 255;
    }
    octx.putImageData(img, 0, 0);
    this.image = off;
  }
  draw(maxWidth, theme) {
    this.theme = theme;
    this.maxWidth = maxWidth;
    this.redraw();
  }
  redraw() {
    const d = this.data, theme = this.theme;
    if (!d || !theme) return;
    let side = Math.max(120, Math.min(560, this.maxWidth - 110));
    // token labels need ~10 px per token: grow past a narrow column (the root scrolls) rather than drop them
    if (d.labels) side = Math.max(side, Math.min(Math.max(d.nq, d.nk) * 10, 640));
    const cw0 = Math.min(28, side / d.nk), ch0 = Math.min(28, side / d.nq);
    const labelsX = d.labels && cw0 >= 8, labelsY = d.labels && ch0 >= 8;
    const measure = this.canvas.getContext("2d");
    measure.font = `10px ${theme.font}`;
    let left = 40;
    if (labelsY) {
      let widest = 0;
      for (let i = 0; i < d.nq; i++) widest = Math.max(widest, measure.measureText(lensShort(d.rowLabel(i))).width);
      left = Math.min(110, widest + 10);
    }
    const top = labelsX ? 78 : 24;
    const plotW = cw0 * d.nk, plotH = ch0 * d.nq;
    const width = left + plotW + 8, height = top + plotH + 8;
    const ctx = lensSizeCanvas(this.canvas, width, height);
    this.geom = { left, top, cw: cw0, ch: ch0 };
    ctx.clearRect(0, 0, width, height);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(this.image, left, top, plotW, plotH);
    ctx.font = `10px ${theme.font}`;
    ctx.fillStyle = theme.muted;
    if (labelsY) {
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      for (let i = 0; i < d.nq; i++) ctx.fillText(lensShort(d.rowLabel(i)), left - 4, top + (i + 0.5) * ch0);
    } else {
      this._ticks(ctx, d.nq, ch0, (pos, text) => {
        ctx.textAlign = "right";
        ctx.textBaseline = "middle";
        ctx.fillText(text, left - 4, top + pos);
      }, d.rowTick);
    }
    if (labelsX) {
      for (let j = 0; j < d.nk; j++) {
        ctx.save();
        ctx.translate(left + (j + 0.5) * cw0, top - 12);
        ctx.rotate(-Math.PI / 3);
        ctx.textAlign = "left";
        ctx.textBaseline = "middle";
        ctx.fillStyle = d.colMarks && d.colMarks[j] ? theme.sink : theme.muted;
        ctx.fillText(lensShort(d.colLabel(j)), 0, 0);
        ctx.restore();
      }
    } else {
      this._ticks(ctx, d.nk, cw0, (pos, text) => {
        ctx.textAlign = "center";
        ctx.textBaseline = "bottom";
        ctx.fillText(text, left + pos, top - 11);
      }, d.colTick);
    }
    if (d.colMarks) {
      // sink keys: a triangle above their column
      ctx.fillStyle = theme.sink;
      for (let j = 0; j < d.nk; j++) {
        if (!d.colMarks[j]) continue;
        const x = left + (j + 0.5) * cw0;
        ctx.beginPath();
        ctx.moveTo(x - 4, top - 9);
        ctx.lineTo(x + 4, top - 9);
        ctx.lineTo(x, top - 2);
        ctx.closePath();
        ctx.fill();
      }
    }
    ctx.strokeStyle = theme.border;
    ctx.lineWidth = 1;
    ctx.strokeRect(left - 0.5, top - 0.5, plotW + 1, plotH + 1);
    if (this.cursor) {
      const [q, k] = this.cursor;
      ctx.strokeStyle = theme.fg;
      ctx.lineWidth = 2;
      ctx.strokeRect(left + k * cw0, top + q * ch0, Math.max(cw0, 3), Math.max(ch0, 3));
    }
  }
  _ticks(ctx, n, cell, put, tokenAt) {
    const total = n * cell;
    const every = Math.max(1, Math.ceil((n * 48) / total));
    for (let i = 0; i < n; i += every) put((i + 0.5) * cell, String(tokenAt ? tokenAt(i) : i));
  }
}

// One value per token (or per block of tokens) as bars; long sequences are max-pooled per pixel column
// so a single sink token is never averaged away.
class LensBars {
  constructor({ label, tooltip, describe, onActivate, height = 90 }) {
    this.canvas = lensEl("canvas", { tabindex: "0", role: "img", "aria-label": label });
    this.el = lensEl("div", { class: "lens-bars" }, this.canvas);
    this.tooltip = tooltip;
    this.describe = describe;
    this.onActivate = onActivate;
    this.height = height;
    this.cursor = -1;
    this.data = null;
    this.canvas.addEventListener("mousemove", (e) => {
      const i = this._hit(e);
      if (i < 0) return this.tooltip.hide();
      this.tooltip.show(e.clientX, e.clientY, this._describeColumn(i));
    });
    this.canvas.addEventListener("mouseleave", () => this.tooltip.hide());
    this.canvas.addEventListener("click", (e) => {
      const i = this._hit(e);
      if (i >= 0) {
        const best = this._argmax(i);
        this.cursor = best;
        this.onActivate(best * this.data.block, e);
      }
    });
    this.canvas.addEventListener("keydown", (e) => this._key(e));
    this.canvas.addEventListener("blur", () => this.tooltip.hide());
  }
  _range(col) {
    const n = this.data.values.length, per = n / this.geom.cols;
    return [Math.floor(col * per), Math.max(Math.floor(col * per) + 1, Math.floor((col + 1) * per))];
  }
  _argmax(col) {
    const [a, b] = this._range(col);
    let best = a;
    for (let i = a; i < b; i++) if (this.data.values[i] > this.data.values[best]) best = i;
    return best;
  }
  _describeColumn(col) {
    const [a, b] = this._range(col);
    if (b - a <= 1) return this.describe(a);
    const best = this._argmax(col);
    return [`${b - a} values pooled (max shown)`, ...this.describe(best)];
  }
  _hit(e) {
    if (!this.geom) return -1;
    const r = this.canvas.getBoundingClientRect();
    const col = Math.floor((e.clientX - r.left - this.geom.left) / this.geom.cw);
    return col >= 0 && col < this.geom.cols ? col : -1;
  }
  _key(e) {
    if (!this.data) return;
    const n = this.data.values.length;
    let i = this.cursor < 0 ? 0 : this.cursor;
    const step = e.shiftKey ? 10 : 1;
    switch (e.key) {
      case "ArrowLeft": i -= step; break;
      case "ArrowRight": i += step; break;
      case "Home": i = 0; break;
      case "End": i = n - 1; break;
      case "Enter":
      case " ":
        e.preventDefault();
        this.onActivate(i * this.data.block, e);
        return;
      default:
        return;
    }
    e.preventDefault();
    this.cursor = Math.max(0, Math.min(n - 1, i));
    this.redraw();
    const r = this.canvas.getBoundingClientRect();
    const col = Math.floor(this.cursor / (n / this.geom.cols));
    this.tooltip.show(r.left + this.geom.left + (col + 0.5) * this.geom.cw, r.top + this.geom.top, this.describe(this.cursor));
  }
  // data: {values: Float32Array, block, marks?: Uint8Array (per value), selected: value index, log: bool}
  setData(data) {
    this.data = data;
    if (this.cursor >= data.values.length) this.cursor = -1;
  }
  draw(maxWidth, theme) {
    this.theme = theme;
    this.maxWidth = maxWidth;
    this.redraw();
  }
  redraw() {
    const d = this.data, theme = this.theme;
    if (!d || !theme) return;
    const n = d.values.length;
    const left = 44, top = 6, bottom = 16;
    const avail = Math.max(100, Math.min(880, this.maxWidth - left - 8));
    const cols = Math.max(1, Math.min(n, Math.floor(avail)));
    const cw = Math.min(24, avail / cols);
    const plotW = cw * cols, plotH = this.height;
    const ctx = lensSizeCanvas(this.canvas, left + plotW + 8, top + plotH + bottom);
    this.geom = { left, top, cw, cols };
    let vmax = 0, vminPos = Infinity;
    for (let i = 0; i < n; i++) {
      const v = d.values[i];
      if (v > vmax) vmax = v;
      if (v > 0 && v < vminPos) vminPos = v;
    }
    const logLo = Math.log10(Math.max(vminPos === Infinity ? 1e-6 : vminPos, vmax * 1e-4 || 1e-6));
    const logHi = Math.log10(vmax || 1);
    const y = (v) => {
      if (!(v > 0)) return 0;
      if (!d.log) return (v / (vmax || 1)) * plotH;
      return Math.max(1, ((Math.log10(v) - logLo) / (logHi - logLo || 1)) * plotH);
    };
    ctx.font = `10px ${theme.font}`;
    ctx.fillStyle = theme.muted;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    ctx.fillText(lensFmt(vmax), left - 4, top + 4);
    ctx.fillText(d.log ? lensFmt(Math.pow(10, logLo)) : "0", left - 4, top + plotH - 2);
    ctx.strokeStyle = theme.border;
    ctx.beginPath();
    ctx.moveTo(left - 0.5, top);
    ctx.lineTo(left - 0.5, top + plotH + 0.5);
    ctx.lineTo(left + plotW, top + plotH + 0.5);
    ctx.stroke();
    const per = n / cols;
    for (let c = 0; c < cols; c++) {
      const a = Math.floor(c * per), b = Math.max(a + 1, Math.floor((c + 1) * per));
      let best = -Infinity, marked = false, selected = false;
      for (let i = a; i < b; i++) {
        if (d.values[i] > best) best = d.values[i];
        if (d.marks && d.marks[i]) marked = true;
        if (i === d.selected) selected = true;
      }
      const h = y(best);
      ctx.fillStyle = marked ? theme.sink : theme.accent;
      ctx.fillRect(left + c * cw + (cw > 3 ? 0.5 : 0), top + plotH - h, Math.max(1, cw - (cw > 3 ? 1 : 0)), h);
      if (selected) {
        ctx.strokeStyle = theme.fg;
        ctx.lineWidth = 1.5;
        ctx.strokeRect(left + c * cw, top, Math.max(cw, 2), plotH);
      }
    }
    if (this.cursor >= 0) {
      const c = Math.floor(this.cursor / per);
      ctx.strokeStyle = theme.fg;
      ctx.setLineDash([3, 2]);
      ctx.strokeRect(left + c * cw, top, Math.max(cw, 2), plotH);
      ctx.setLineDash([]);
    }
    ctx.fillStyle = theme.muted;
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillText("0", left, top + plotH + 3);
    ctx.textAlign = "right";
    ctx.fillText(String(n * d.block - 1), left + plotW, top + plotH + 3);
  }
}

// Tokens as focusable chips coloured by a value (roving tabindex; arrows move, Enter selects).
class LensChips {
  constructor({ label, tooltip, describe, onActivate, text = false }) {
    this.el = lensEl("div", { class: "lens-chips" + (text ? " lens-chips-text" : ""), role: "listbox", "aria-label": label, "aria-orientation": "horizontal" });
    this.tooltip = tooltip;
    this.describe = describe;
    this.onActivate = onActivate;
    this.chips = [];
    this.offset = 0;
    this.focusIndex = 0;
    this.el.addEventListener("click", (e) => {
      const chip = e.target.closest(".lens-chip");
      if (!chip) return;
      this._focus(this.chips.indexOf(chip), false);
      this.onActivate(this.offset + this.chips.indexOf(chip), e);
    });
    this.el.addEventListener("mousemove", (e) => {
      const chip = e.target.closest(".lens-chip");
      if (!chip) return this.tooltip.hide();
      this.tooltip.show(e.clientX, e.clientY, this.describe(this.offset + this.chips.indexOf(chip)));
    });
    this.el.addEventListener("mouseleave", () => this.tooltip.hide());
    this.el.addEventListener("focusout", () => this.tooltip.hide());
    this.el.addEventListener("keydown", (e) => {
      let i = this.focusIndex;
      switch (e.key) {
        case "ArrowLeft": case "ArrowUp": i -= 1; break;
        case "ArrowRight": case "ArrowDown": i += 1; break;
        case "Home": i = 0; break;
        case "End": i = this.chips.length - 1; break;
        case "Enter": case " ":
          e.preventDefault();
          this.onActivate(this.offset + this.focusIndex, e);
          return;
        default:
          return;
      }
      e.preventDefault();
      this._focus(Math.max(0, Math.min(this.chips.length - 1, i)));
    });
  }
  _focus(i, move = true) {
    if (!this.chips.length) return;
    if (this.chips[this.focusIndex]) this.chips[this.focusIndex].tabIndex = -1;
    this.focusIndex = i;
    this.chips[i].tabIndex = 0;
    if (move) {
      this.chips[i].focus();
      this.tooltip.showAt(this.chips[i], this.describe(this.offset + i));
    }
  }
  // items: [{text, bg: [r,g,b] | null, sink, special, space, selected}], offset: index of items[0]
  setItems(items, offset = 0) {
    this.offset = offset;
    this.chips = items.map((item) => {
      const style = {};
      if (item.bg) {
        style.background = lensCss(item.bg);
        style.color = lensLuma(item.bg) > 0.55 ? "#111" : "#fff";
      }
      return lensEl("span", {
        class: "lens-chip" + (item.special ? " lens-chip-special" : "") + (item.sink ? " lens-chip-sink" : "") + (item.space ? " lens-chip-space" : ""),
        role: "option",
        tabindex: "-1",
        "aria-selected": item.selected ? "true" : "false",
        "aria-label": item.label,
        text: item.text,
        style,
      });
    });
    this.el.replaceChildren(...this.chips);
    this.focusIndex = Math.min(this.focusIndex, Math.max(0, this.chips.length - 1));
    if (this.chips.length) this.chips[this.focusIndex].tabIndex = 0;
  }
}

function lensSequenceSelect(model, info, onChange) {
  if ((info.n_sequences || 1) <= 1) return null;
  const select = lensEl("select", { "aria-label": "sequence" });
  for (let s = 0; s < info.n_sequences; s++) {
    const text = info.texts && info.texts[s] ? lensShort(info.texts[s], 40) : `sequence ${s}`;
    select.append(lensEl("option", { value: s, text: `${s}: ${text} (${info.lengths[s]} tokens)` }));
  }
  select.value = String(model.get("seq"));
  select.addEventListener("change", () => onChange(Number(select.value)));
  return select;
}

// -- SVG line charts (ValleyPlot, CompareView) ---------------------------------------------------------

const LENS_SVGNS = "http://www.w3.org/2000/svg";
function lensSvg(tag, attrs, ...children) {
  const el = document.createElementNS(LENS_SVGNS, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) el.setAttribute(key, String(value));
  }
  for (const child of children.flat()) if (child) el.append(child);
  return el;
}

function lensTicks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => span / s <= count) || 10 * mag;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

// opts: {width, height, title, xMin, xMax, xTicks: number[], xFmt, yLog, yDomain?, series: [{values, xs, color,
//        dash, opacity, label}], refLines: [{y, label}], shades: [{x0, x1, color}], vlines: [{x, color}]}
function lensLineChart(opts) {
  const { width, height, title, xMin, xMax, yLog = false, series, refLines = [], shades = [], vlines = [] } = opts;
  const m = { l: 54, r: 14, t: 20, b: 22 };
  const ys = [];
  for (const s of series) for (const v of s.values) if (Number.isFinite(v) && (!yLog || v > 0)) ys.push(yLog ? Math.log10(v) : v);
  for (const r of refLines) ys.push(yLog ? Math.log10(r.y) : r.y);
  let lo = ys.length ? Math.min(...ys) : 0, hi = ys.length ? Math.max(...ys) : 1;
  if (opts.yDomain) [lo, hi] = yLog ? opts.yDomain.map(Math.log10) : opts.yDomain;
  if (hi - lo < 1e-9) {
    lo -= yLog ? 0.5 : Math.max(0.05, Math.abs(lo) * 0.1);
    hi += yLog ? 0.5 : Math.max(0.05, Math.abs(hi) * 0.1);
  }
  const pad = (hi - lo) * 0.06;
  lo -= pad;
  hi += pad;
  const pw = width - m.l - m.r, ph = height - m.t - m.b;
  const x = (v) => m.l + ((v - xMin) / (xMax - xMin || 1)) * pw;
  const y = (v) => m.t + (1 - ((yLog ? Math.log10(v) : v) - lo) / (hi - lo)) * ph;
  const svg = lensSvg("svg", { width, height, viewBox: `0 0 ${width} ${height}` });
  svg.append(lensSvg("text", { x: m.l, y: 12, class: "lens-chart-title" }));
  svg.lastChild.textContent = title;
  const axis = lensSvg("g", { class: "lens-axis" });
  axis.append(lensSvg("path", { d: `M${m.l},${m.t}V${m.t + ph}H${m.l + pw}`, fill: "none" }));
  let yTicks = yLog ? lensTicks(Math.ceil(lo), Math.floor(hi), 4).filter(Number.isInteger) : lensTicks(lo + pad, hi - pad, 4);
  if (yLog && yTicks.length < 2) {
    // less than two decades: linear-spaced values, placed on the log axis
    yTicks = lensTicks(Math.pow(10, lo + pad), Math.pow(10, hi - pad), 3).filter((v) => v > 0).map(Math.log10);
  }
  for (const t of yTicks) {
    const yy = m.t + (1 - (t - lo) / (hi - lo)) * ph;
    axis.append(lensSvg("line", { x1: m.l - 4, x2: m.l, y1: yy, y2: yy }));
    const label = lensSvg("text", { x: m.l - 6, y: yy + 3, "text-anchor": "end" });
    label.textContent = yLog ? lensFmt(Math.pow(10, t)) : lensFmt(t);
    axis.append(label);
  }
  for (const t of opts.xTicks || []) {
    const xx = x(t);
    axis.append(lensSvg("line", { x1: xx, x2: xx, y1: m.t + ph, y2: m.t + ph + 4 }));
    const label = lensSvg("text", { x: xx, y: m.t + ph + 15, "text-anchor": "middle" });
    label.textContent = (opts.xFmt || String)(t);
    axis.append(label);
  }
  svg.append(axis);
  for (const s of shades) {
    svg.append(lensSvg("rect", { x: x(s.x0), y: m.t, width: Math.max(1, x(s.x1) - x(s.x0)), height: ph, fill: s.color, opacity: 0.1 }));
  }
  for (const r of refLines) {
    if (yLog && !(r.y > 0)) continue;
    svg.append(lensSvg("line", { x1: m.l, x2: m.l + pw, y1: y(r.y), y2: y(r.y), style: "stroke: var(--lens-muted)", "stroke-dasharray": "2 3" }));
  }
  for (const v of vlines) {
    svg.append(lensSvg("line", { x1: x(v.x), x2: x(v.x), y1: m.t, y2: m.t + ph, stroke: v.color, "stroke-dasharray": "1 3", "stroke-width": 1.5 }));
  }
  for (const s of series) {
    let d = "", pen = false;
    const points = [];
    s.values.forEach((v, i) => {
      const xv = s.xs ? s.xs[i] : i;
      if (!Number.isFinite(v) || (yLog && !(v > 0))) {
        pen = false;
        return;
      }
      d += `${pen ? "L" : "M"}${x(xv).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
      points.push([x(xv), y(v)]);
    });
    if (!d) continue;
    const g = lensSvg("g", { opacity: s.opacity ?? 1, "data-series": s.label });
    g.append(lensSvg("path", { d, fill: "none", stroke: s.color, "stroke-width": 1.8, "stroke-dasharray": s.dash || null }));
    if (!s.dash && points.length <= 64) for (const [px, py] of points) g.append(lensSvg("circle", { cx: px, cy: py, r: 2.4, fill: s.color }));
    svg.append(g);
  }
  const cursor = lensSvg("line", { y1: m.t, y2: m.t + ph, style: "stroke: var(--lens-fg)", "stroke-width": 1, visibility: "hidden" });
  svg.append(cursor);
  return {
    svg,
    x,
    y,
    margin: m,
    plotWidth: pw,
    setCursor(xv) {
      if (xv === null || xv === undefined) return cursor.setAttribute("visibility", "hidden");
      cursor.setAttribute("x1", x(xv));
      cursor.setAttribute("x2", x(xv));
      cursor.setAttribute("visibility", "visible");
    },
    invert(px) {
      return xMin + ((px - m.l) / pw) * (xMax - xMin);
    },
  };
}

// Token backgrounds: blend a colour into the page background by |t|, so light and dark themes both keep
// the text readable and 0 looks like "nothing".
function lensBlend(bgRgb, rgb, t) {
  const a = Math.max(0, Math.min(1, t)) * 0.9;
  return [0, 1, 2].map((c) => Math.round(bgRgb[c] + a * (rgb[c] - bgRgb[c])));
}
const LENS_NEG = lensHexRgb("#2166ac"), LENS_POS = lensHexRgb("#b2182b"), LENS_SEQ = lensHexRgb("#e6550d");

function lensValueColor(theme, v, { diverging, vmin, vmax }) {
  if (!Number.isFinite(v)) return null;
  if (diverging) {
    const t = v / (Math.max(Math.abs(vmin), Math.abs(vmax)) || 1);
    return lensBlend(theme.bgRgb, t < 0 ? LENS_NEG : LENS_POS, Math.abs(t));
  }
  return lensBlend(theme.bgRgb, LENS_SEQ, (v - vmin) / (vmax - vmin || 1));
}

function lensValueBar(theme, scale, label) {
  const canvas = lensEl("canvas", { "aria-hidden": "true" });
  const ctx = lensSizeCanvas(canvas, 140, 10);
  for (let x = 0; x < 140; x++) {
    const v = scale.vmin + ((scale.vmax - scale.vmin) * x) / 139;
    ctx.fillStyle = lensCss(lensValueColor(theme, v, scale) || theme.bgRgb);
    ctx.fillRect(x, 0, 1, 10);
  }
  ctx.strokeStyle = theme.border;
  ctx.strokeRect(0.5, 0.5, 139, 9);
  return lensEl(
    "div",
    { class: "lens-colorbar", role: "img", "aria-label": `${label}: from ${lensFmt(scale.vmin)} to ${lensFmt(scale.vmax)}${scale.diverging ? ", 0 uncoloured" : ""}` },
    lensEl("span", { text: label }),
    lensEl("span", { text: lensFmt(scale.vmin) }),
    canvas,
    lensEl("span", { text: lensFmt(scale.vmax) }),
  );
}

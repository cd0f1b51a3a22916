// lens widgets — core helpers shared by every component: DOM, typed buffers, colours, theme, tooltip.
//
// lens.widgets prepends this file (then _grids.js and _charts.js) to each component's module text, so
// each component is still one self-contained ES module (anywidget and Panel load ESM from a blob URL, which cannot import a sibling
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


// lens widgets — shared views: token bars, chips, sequence picker, SVG line charts, value colours.
//
// Prepended (after _core.js and _grids.js) to each component's module text; see _core.js for why.


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

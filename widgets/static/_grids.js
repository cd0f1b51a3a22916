// lens widgets — shared canvas views: the layer × head grid and the token × token heatmap.
//
// Prepended (after _core.js) to each component's module text; see _core.js for why.

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

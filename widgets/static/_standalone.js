// Boot code of a lens standalone HTML export (inlined by LensWidget.to_html; never loaded by a kernel).
//
// It plays the widget model for the component's unchanged render(): `get`/`set`/`save_changes`/`on`/`off`
// like anywidget's model, with the Python side replaced by a table precomputed at export time
// (selection → derived traits). Everything it needs is in this page: the component's ESM, its CSS and
// the data (gzip + base64). Nothing is fetched.

function lensHalfTable() {
  // IEEE half → float32 for all 65536 bit patterns: decoding is then one lookup per number
  const table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) table[h] = sign * Math.pow(2, -14) * (frac / 1024);
    else if (exp === 31) table[h] = frac ? NaN : sign * Infinity;
    else table[h] = sign * Math.pow(2, exp - 15) * (1 + frac / 1024);
  }
  return table;
}

async function lensInflate(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

class LensStaticModel {
  constructor(state, table, selection) {
    this.state = state;
    this.table = table;
    this.selection = selection;
    this.pending = {};
    this.listeners = new Map();
  }
  get(name) {
    return this.state[name];
  }
  set(name, value) {
    this.pending[name] = value;
  }
  save_changes() {
    const changed = new Set();
    for (const [name, value] of Object.entries(this.pending)) {
      if (JSON.stringify(this.state[name]) !== JSON.stringify(value)) {
        this.state[name] = value;
        changed.add(name);
      }
    }
    this.pending = {};
    if (this.selection.some((name) => changed.has(name))) {
      const key = JSON.stringify(this.selection.map((name) => this.state[name]));
      const derived = this.table[key];
      if (derived) {
        for (const [name, value] of Object.entries(derived)) {
          this.state[name] = value;
          changed.add(name);
        }
      }
    }
    for (const name of changed) this._emit(`change:${name}`);
    if (changed.size) this._emit("change");
  }
  on(event, callback) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(callback);
  }
  off(event, callback) {
    if (!event) return this.listeners.clear();
    if (!callback) return this.listeners.delete(event);
    const set = this.listeners.get(event);
    if (set) set.delete(callback);
  }
  send() {
    // no kernel: requests that need Python are disabled by the components when `live` is false
  }
  _emit(event) {
    for (const callback of this.listeners.get(event) || []) callback();
  }
}

async function lensBoot() {
  const manifest = JSON.parse(document.getElementById("lens-manifest").textContent);
  const source = JSON.parse(document.getElementById("lens-esm").textContent);
  const raw = await lensInflate(document.getElementById("lens-data").textContent.trim());
  let half = null;
  const views = manifest.blobs.map(([offset, length, enc]) => {
    const slice = raw.slice(offset, offset + length);
    if (enc !== "f16") return new DataView(slice.buffer);
    half = half || lensHalfTable();
    const bits = new Uint16Array(slice.buffer);
    const out = new Float32Array(bits.length);
    for (let i = 0; i < bits.length; i++) out[i] = half[bits[i]];
    return new DataView(out.buffer);
  });
  const resolve = (value) => {
    if (value && typeof value === "object" && "$lensblob" in value) return views[value.$lensblob];
    if (value && typeof value === "object" && "$lensvalue" in value) return manifest.values[value.$lensvalue];
    return value;
  };
  const decode = (obj) => Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, resolve(v)]));
  const table = Object.fromEntries(Object.entries(manifest.table).map(([k, v]) => [k, decode(v)]));
  const model = new LensStaticModel(decode(manifest.state), table, manifest.selection);
  const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
  const module = await import(url);
  URL.revokeObjectURL(url);
  const app = document.getElementById("lens-app");
  await module.default.render({ model, el: app });
  app.dataset.booted = "true";
}

lensBoot().catch((error) => {
  const app = document.getElementById("lens-app");
  app.textContent = `This lens view could not start: ${error}`;
  console.error(error);
});

// DCNR dashboard. Every string that comes from the mesh (job ids, model, PNode and VNode names,
// error messages) reaches the page through textContent or an attribute, never as markup.
'use strict';

const SVG = 'http://www.w3.org/2000/svg';
const MAX_POINTS = 2000;
const MAX_EVENTS = 500;

const state = {
  selected: null,      // job id shown in the job panel
  train: new Map(),    // seq -> train point of the selected job
  test: [],            // test points of the selected job
  eventSeq: 0,         // newest event shown
  source: null,        // the EventSource
};

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k === 'onclick') e.addEventListener('click', v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

const fmt = {
  num: (v, d = 4) => (v === null || v === undefined || !isFinite(v) ? '–' : Number(v).toFixed(d)),
  pct: (v) => (v === null || v === undefined || !isFinite(v) ? '–' : (100 * v).toFixed(2) + '%'),
  rate: (v) => (!v ? '–' : v >= 1000 ? (v / 1000).toFixed(1) + 'k' : v.toFixed(0)),
  bytes: (v) => {
    if (!v) return '–';
    const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return v.toFixed(i ? 1 : 0) + ' ' + u[i];
  },
  time: (ms) => new Date(ms).toLocaleTimeString([], { hour12: false }),
};

async function getJSON(path) {
  const r = await fetch(path, { headers: { Accept: 'application/json' } });
  if (!r.ok) throw new Error(path + ': ' + r.status);
  return r.json();
}

// ---- jobs list ----------------------------------------------------------------------------

function renderJobs(jobs) {
  const body = document.querySelector('#jobs tbody');
  body.replaceChildren(...jobs.map((j) => {
    const fill = el('span');
    // CSSOM, not a style attribute: the page's CSP allows no inline styles.
    fill.style.width = (100 * j.progress).toFixed(1) + '%';
    const bar = el('span', { class: 'progress' }, fill);
    const tr = el('tr', { class: 'job-row' + (j.job_id === state.selected ? ' selected' : ''), 'data-job': j.job_id,
      onclick: () => select(j.job_id) },
      el('td', { text: j.job_id }),
      el('td', {}, el('span', { class: 'badge state-' + j.state, text: j.state })),
      el('td', { text: j.model }),
      el('td', {}, bar, `${j.steps_done}/${j.steps_total}`),
      el('td', { text: fmt.num(j.last_loss) }),
      el('td', { text: fmt.rate(j.samples_per_s) }),
      el('td', { text: fmt.pct(j.test_accuracy) }),
      el('td', { text: `${j.vnodes} on ${j.pnodes}` }));
    if (j.error) tr.title = j.error;
    return tr;
  }));
  document.getElementById('jobs-empty').hidden = jobs.length > 0;
  if (!state.selected && jobs.length) {
    const running = jobs.find((j) => j.state === 'running' || j.state === 'pending');
    select((running || jobs[0]).job_id);
  }
}

// ---- mesh ---------------------------------------------------------------------------------

function renderPNodes(pnodes) {
  const body = document.querySelector('#pnodes tbody');
  body.replaceChildren(...pnodes.map((p) => {
    const hosted = p.vnodes.length
      ? p.vnodes.map((v) => `${v.name} (${v.job})`).join(', ')
      : (p.hosted_vnodes ? `${p.hosted_vnodes} VNodes` : '–');
    let reach = p.reach.relayed_via ? `relayed via ${p.reach.relayed_via}` : 'direct';
    if (!p.reachable) reach = p.reach.relayed_via ? `${reach} (not listening)` : 'unreachable (no relay)';
    if (p.reach.relay_offer) reach += `, relays at ${p.reach.relay_offer}`;
    return el('tr', { 'data-pnode': p.id },
      el('td', { text: p.id }),
      el('td', { text: p.name }),
      el('td', {}, el('span', { class: 'badge h-' + p.health, text: p.health })),
      el('td', { class: 'wrap', text: reach }),
      el('td', { text: p.trust || 'n/a' }),
      el('td', { text: p.caps.cores }),
      el('td', { text: fmt.bytes(p.caps.memory_bytes) }),
      el('td', { text: p.caps.determinism_class || p.caps.arch }),
      el('td', { text: fmt.rate(p.vnode_steps_per_s) }),
      el('td', { text: p.bytes_per_s ? fmt.bytes(p.bytes_per_s) + '/s' : '–' }),
      el('td', { class: 'wrap hosted', text: hosted }));
  }));
  document.getElementById('pnodes-empty').hidden = pnodes.length > 0;
}

// ---- one job ------------------------------------------------------------------------------

function renderJobHeader(d) {
  const j = d.job;
  document.getElementById('job-title').textContent = j.job_id;
  const badge = document.getElementById('job-state');
  badge.textContent = j.state;
  badge.className = 'badge state-' + j.state;
  const parts = [`${j.model}`, `step ${j.steps_done}/${j.steps_total}`, `loss ${fmt.num(j.last_loss)}`,
    `${fmt.rate(j.samples_per_s)} samples/s`, `${j.vnodes} VNodes on ${j.pnodes} PNode(s)`];
  if (j.pipelines > 1) {
    parts.push(`${j.pipelines} pipelines, ${j.rounds} rounds`);
    (j.members || []).forEach((m, p) => parts.push(`pipeline ${p}: ${m.length ? m.join(', ') : '(unplaced)'}`));
  }
  if (j.error) parts.push('error: ' + j.error);
  document.getElementById('job-line').textContent = parts.join(' · ');
}

function renderGraph(vnodes) {
  const g = document.getElementById('graph');
  const items = [];
  vnodes.forEach((v, i) => {
    if (i > 0) items.push(el('span', { class: 'arrow', text: '→' }));
    const inputs = v.inputs.map((s) => (/^\d+$/.test(s) ? (vnodes[Number(s)] || { name: s }).name : s)).join(', ');
    const card = el('div', { class: 'vnode h-' + v.health, 'data-vnode': v.vnode, 'data-pnode': v.pnode || '' },
      el('div', { class: 'name', text: v.name }),
      el('div', { class: 'kind', text: `${v.kind}${v.params ? ' · ' + v.params + ' params' : ''}` }),
      el('div', { class: 'meta', text: 'on ' + (v.pnode ? `${v.pnode} (${v.pnode_name})` : 'not placed') }),
      el('div', { class: 'meta', text: `step ${v.step} · ${v.health}` }),
      el('div', { class: 'meta', text: 'from ' + inputs }));
    if (v.failure) card.title = v.failure;
    items.push(card);
  });
  g.replaceChildren(...items);
}

function chart(id, series, testKey) {
  const root = document.getElementById(id);
  const W = 480, H = 220, L = 44, R = 10, T = 10, B = 26;
  const train = series.train, test = series.test;
  const all = train.map((p) => p[testKey]).concat(test.map((p) => p[testKey])).filter((v) => isFinite(v));
  const steps = train.map((p) => p.step).concat(test.map((p) => p.step));
  const nodes = [];
  let lo = Math.min(...all), hi = Math.max(...all);
  if (!all.length) { lo = 0; hi = 1; }
  if (testKey === 'accuracy') { lo = Math.min(lo, 0); hi = Math.max(hi, 1); }
  if (hi - lo < 1e-9) { hi = lo + 1; }
  const smax = Math.max(1, ...steps);
  const x = (s) => L + (W - L - R) * (s / smax);
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  nodes.push(svg('line', { class: 'axis', x1: L, y1: H - B, x2: W - R, y2: H - B }));
  nodes.push(svg('line', { class: 'axis', x1: L, y1: T, x2: L, y2: H - B }));
  for (const v of [lo, (lo + hi) / 2, hi]) {
    nodes.push(svg('text', { class: 'tick', x: L - 4, y: y(v) + 3, 'text-anchor': 'end' }, v.toFixed(testKey === 'accuracy' ? 2 : 3)));
  }
  nodes.push(svg('text', { class: 'tick', x: L, y: H - 8 }, '0'));
  nodes.push(svg('text', { class: 'tick', x: W - R, y: H - 8, 'text-anchor': 'end' }, `step ${smax}`));
  const pts = train.filter((p) => isFinite(p[testKey])).map((p) => `${x(p.step).toFixed(1)},${y(p[testKey]).toFixed(1)}`);
  if (pts.length) nodes.push(svg('polyline', { class: 'train', points: pts.join(' ') }));
  const tpts = test.filter((p) => isFinite(p[testKey]));
  if (tpts.length > 1) {
    nodes.push(svg('polyline', { class: 'test-line', points: tpts.map((p) => `${x(p.step).toFixed(1)},${y(p[testKey]).toFixed(1)}`).join(' ') }));
  }
  for (const p of tpts) nodes.push(svg('circle', { class: 'test', cx: x(p.step).toFixed(1), cy: y(p[testKey]).toFixed(1), r: 3.5 }));
  root.replaceChildren(...nodes);
  root.setAttribute('data-points', String(pts.length));
  root.setAttribute('data-test-points', String(tpts.length));
}

function renderCharts() {
  const train = [...state.train.values()].sort((a, b) => a.seq - b.seq);
  chart('loss-chart', { train, test: state.test }, 'loss');
  chart('acc-chart', { train, test: state.test }, 'accuracy');
}

let chartsPending = false;
function scheduleCharts() {
  if (chartsPending) return;
  chartsPending = true;
  requestAnimationFrame(() => { chartsPending = false; renderCharts(); });
}

function addTrain(p) {
  state.train.set(p.seq, p);
  if (state.train.size > MAX_POINTS) {
    // Keep the curve's span: drop every other of the older half.
    const seqs = [...state.train.keys()].sort((a, b) => a - b);
    seqs.slice(0, seqs.length / 2).forEach((s, i) => { if (i % 2) state.train.delete(s); });
  }
}

async function loadJob(id) {
  const d = await getJSON('/api/jobs/' + encodeURIComponent(id));
  if (state.selected !== id) return;
  for (const p of d.train) addTrain(p);
  state.test = d.test;
  document.getElementById('job').hidden = false;
  renderJobHeader(d);
  renderGraph(d.vnodes);
  renderCharts();
}

function select(id) {
  if (state.selected === id) return;
  state.selected = id;
  state.train = new Map();
  state.test = [];
  history.replaceState(null, '', '#job=' + encodeURIComponent(id));
  document.querySelectorAll('#jobs tr.job-row').forEach((tr) => tr.classList.toggle('selected', tr.dataset.job === id));
  connect();
}

// ---- events -------------------------------------------------------------------------------

function addEvents(events) {
  const list = document.getElementById('events');
  for (const e of events) {
    if (e.seq <= state.eventSeq) continue;
    state.eventSeq = e.seq;
    const li = el('li', { class: 'sev-' + e.severity, 'data-kind': e.kind },
      el('span', { class: 'time', text: fmt.time(e.at_ms) }),
      el('span', { class: 'kind', text: e.kind }),
      el('span', { class: 'msg', text: e.message }));
    list.prepend(li);
  }
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

// ---- live stream --------------------------------------------------------------------------

function setConn(s) {
  const c = document.getElementById('conn');
  c.dataset.state = s;
  c.textContent = s;
}

function connect() {
  if (state.source) state.source.close();
  const url = '/api/stream' + (state.selected ? '?job=' + encodeURIComponent(state.selected) : '');
  const src = new EventSource(url);
  state.source = src;
  const on = (name, f) => src.addEventListener(name, (m) => { if (state.source === src) f(JSON.parse(m.data)); });
  src.onopen = () => {
    setConn('live');
    // Fetched after the stream opened, so no point falls between the two.
    if (state.selected) loadJob(state.selected).catch(() => {});
    getJSON('/api/events?since=' + state.eventSeq + '&limit=200').then(addEvents).catch(() => {});
  };
  src.onerror = () => setConn('lost');
  on('overview', (o) => { renderJobs(o.jobs); renderPNodes(o.pnodes); });
  on('job', (d) => {
    if (d.job.job_id !== state.selected) return;
    document.getElementById('job').hidden = false;
    renderJobHeader(d);
    renderGraph(d.vnodes);
  });
  on('train', (u) => { if (u.job === state.selected) { addTrain(u.point); scheduleCharts(); } });
  on('test', (u) => { if (u.job === state.selected) { state.test.push(u.point); scheduleCharts(); } });
  on('event', (e) => addEvents([e]));
  src.addEventListener('resync', () => { if (state.selected) loadJob(state.selected).catch(() => {}); });
}

function start() {
  const m = /#job=([^&]+)/.exec(location.hash);
  if (m) state.selected = decodeURIComponent(m[1]);
  connect();
}

document.addEventListener('DOMContentLoaded', start);

// The admin console: plain JavaScript over the service's own API, no framework, no build.
// Everything a person typed is put in the page as text (textContent), never as HTML.
'use strict';

const $ = (id) => document.getElementById(id);
const KEY = 'coupons.console.token';
let token = sessionStorage.getItem(KEY);
let current = null;   // the coupon open in the detail view, as last read
let etag = null;      // its ETag, sent as If-Match by every change
let editing = null;   // the coupon being edited (null: a new one)
let poller = null;
const POINTS = 60;    // the chart's width: a minute of polls
let series = [];      // the chart's points: {rate, remaining}
let last = null;      // the last poll: {made: claims made so far, at: ms}

// ---- the API ----

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.detail) || 'HTTP ' + status);
    this.status = status;
    this.code = body && body.code;
  }
}

async function api(method, path, body, headers = {}) {
  const h = Object.assign({}, headers);
  if (token) h.Authorization = 'Bearer ' + token;
  if (body !== undefined) h['Content-Type'] = 'application/json';
  const r = await fetch(path, {
    method, headers: h, cache: 'no-store',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (r.status === 401 && path !== '/login') {
    logout('Your session has ended: log in again.');
  }
  if (!r.ok) throw new ApiError(r.status, data);
  const link = /<([^>]+)>;\s*rel="next"/.exec(r.headers.get('Link') || '');
  return { data, etag: r.headers.get('ETag'), next: link ? link[1] : null };
}

// ---- small helpers ----

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'class') e.className = v;
    else if (k === 'data') Object.assign(e.dataset, v);
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : String(c ?? ''));
  return e;
}

function say(text, kind = 'info', reload = false) {
  $('message').hidden = !text;
  $('message').className = kind;
  $('message-text').textContent = text || '';
  $('reload').hidden = !reload;
}

function fail(e) {
  if (e instanceof ApiError && e.status === 412) {
    say('Changed by someone else since you opened it: reload, then make your change again.', 'error', true);
  } else {
    say(e.message + (e.code ? ' (' + e.code + ')' : ''), 'error');
  }
}

function when(ts) { return ts ? ts.replace('T', ' ').replace(/(\.\d+)?Z$/, '') : ''; }

function windowOf(c) {
  if (!c.starts_at && !c.ends_at) return 'always';
  return (when(c.starts_at) || '…') + ' to ' + (when(c.ends_at) || '…');
}

function statusOf(c) { return c.deleted_at ? 'deleted' : c.status; }

// Every claim the coupon ever had, whatever became of it.
function claimsMade(c) {
  return c.held + c.claimed + c.redeemed + c.voided + c.released + c.expired;
}

// The stock as a bar: available, held, claimed and redeemed add up to the total; voided,
// released and expired units went back into available.
function stockBar(c) {
  const parts = ['available_count', 'held', 'claimed', 'redeemed'];
  const names = { available_count: 'available' };
  const sum = parts.reduce((n, p) => n + c[p], 0) || 1;
  const bar = el('div', { class: 'bar', title: c.total_count + ' in all' });
  for (const p of parts) {
    const seg = el('span', { class: 'seg ' + (names[p] || p) });
    seg.style.width = (100 * c[p] / sum) + '%';
    bar.append(seg);
  }
  const legend = parts.map((p) => (names[p] || p) + ' ' + c[p]).join(' · ') +
    ' · voided ' + c.voided + ' · released ' + c.released + ' · expired ' + c.expired;
  return el('div', {
    class: 'stock',
    data: { available: c.available_count, held: c.held, claimed: c.claimed,
      redeemed: c.redeemed, voided: c.voided },
  }, bar, el('small', {}, legend));
}

function show(view) {
  for (const id of ['login', 'coupons', 'editor', 'detail', 'audit']) $(id).hidden = id !== view;
  if (view !== 'detail') stopPolling();
}

// ---- logging in ----

async function login(ev) {
  ev.preventDefault();
  const f = ev.target;
  try {
    const r = await api('POST', '/login', { email: f.email.value, password: f.password.value });
    token = r.data.token;
    sessionStorage.setItem(KEY, token);
    sessionStorage.setItem(KEY + '.email', f.email.value);
    f.reset();
    await start();
  } catch (e) { fail(e); }
}

function logout(why) {
  token = null;
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(KEY + '.email');
  $('tabs').hidden = $('logout').hidden = true;
  $('who').textContent = '';
  show('login');
  say(why || '');
}

async function start() {
  try {
    await loadCoupons();
  } catch (e) {
    if (e.status === 403) logout('This account is not an admin.');
    else fail(e);
    return;
  }
  $('tabs').hidden = $('logout').hidden = false;
  $('who').textContent = sessionStorage.getItem(KEY + '.email') || '';
  say('');
  show('coupons');
}

// ---- the list ----

async function loadCoupons(next) {
  const f = $('filter');
  const q = new URLSearchParams({ limit: '50' });
  if (f.status.value) q.set('status', f.status.value);
  if (f.q.value) q.set('q', f.q.value);
  const r = await api('GET', next || '/admin/coupons?' + q);
  const body = $('coupon-table').tBodies[0];
  if (!next) body.replaceChildren();
  for (const c of r.data) {
    body.append(el('tr', { data: { code: c.code } },
      el('td', {}, el('a', { href: '#', onclick: (ev) => { ev.preventDefault(); openCoupon(c.id); } }, c.code)),
      el('td', {}, c.name || ''),
      el('td', { class: 'status' }, statusOf(c)),
      el('td', {}, windowOf(c)),
      el('td', {}, stockBar(c))));
  }
  $('more-coupons').hidden = !r.next;
  $('more-coupons').onclick = () => loadCoupons(r.next).catch(fail);
}

// ---- creating and editing ----

const FIELDS = ['code', 'available_count', 'status', 'name', 'per_user_limit', 'starts_at',
  'ends_at', 'percent_off', 'amount_off', 'currency', 'min_order_amount'];
const NUMBERS = ['available_count', 'per_user_limit', 'percent_off', 'amount_off', 'min_order_amount'];
const TIMES = ['starts_at', 'ends_at'];

function toInput(field, v) {
  if (v === null || v === undefined) return '';
  if (TIMES.includes(field)) return v.slice(0, 16); // RFC 3339 in UTC, to the minute
  return String(v);
}

function fromInput(field, v) {
  if (v === '') return field === 'status' ? 'ACTIVE' : null;
  if (NUMBERS.includes(field)) return Number(v);
  if (TIMES.includes(field)) return v + ':00Z';
  return v;
}

function openEditor(coupon) {
  editing = coupon;
  const f = $('coupon-form');
  $('editor-title').textContent = coupon ? 'Edit ' + coupon.code : 'New coupon';
  for (const k of FIELDS) f[k].value = coupon ? toInput(k, coupon[k]) : (k === 'status' ? 'ACTIVE' : '');
  show('editor');
}

async function save(ev) {
  ev.preventDefault();
  const f = ev.target;
  const body = {};
  for (const k of FIELDS) {
    const v = fromInput(k, f[k].value);
    // An edit sends what changed only; a new coupon what was given.
    if (editing ? toInput(k, editing[k]) !== f[k].value : v !== null) body[k] = v;
  }
  try {
    if (editing) {
      const r = await api('PUT', '/admin/coupons/' + editing.id, body, { 'If-Match': etag });
      say('Saved ' + r.data.code + '.');
      await openCoupon(r.data.id);
    } else {
      const r = await api('POST', '/admin/coupons', body);
      say('Created ' + r.data.code + '.');
      await openCoupon(r.data.id);
    }
  } catch (e) { fail(e); }
}

// After a 412: read the coupon again, into the form if it is open.
async function reload() {
  const id = (editing || current).id;
  const r = await api('GET', '/admin/coupons/' + id);
  current = r.data;
  etag = r.etag;
  say('Reloaded: this is the coupon as it is now.');
  if (!$('editor').hidden) openEditor(r.data); else renderCoupon();
}

// ---- one coupon ----

async function openCoupon(id) {
  const r = await api('GET', '/admin/coupons/' + id);
  current = r.data;
  etag = r.etag;
  editing = null;
  series = [{ rate: 0, remaining: current.available_count }];
  last = { made: claimsMade(current), at: Date.now() };
  renderCoupon();
  show('detail');
  await loadClaims();
  startPolling();
}

function renderCoupon() {
  const c = current;
  $('detail-title').textContent = c.code + (c.name ? ': ' + c.name : '');
  $('detail-info').textContent = statusOf(c) + ', ' + windowOf(c) +
    (c.per_user_limit ? ', ' + c.per_user_limit + ' per user' : '') +
    (c.percent_off ? ', ' + c.percent_off + '% off' : '') +
    (c.amount_off ? ', ' + c.amount_off + ' ' + c.currency + ' off' : '');
  $('detail-info').dataset.status = statusOf(c);
  $('detail-stock').replaceChildren(stockBar(c));
  $('deactivate').disabled = c.status === 'INACTIVE' || !!c.deleted_at;
  $('delete').disabled = $('edit').disabled = !!c.deleted_at;
}

async function loadClaims(next) {
  const r = await api('GET', next || '/admin/coupons/' + current.id + '/claims?limit=20');
  const body = $('claims-table').tBodies[0];
  if (!next) body.replaceChildren();
  for (const cl of r.data) {
    const live = ['held', 'claimed', 'redeemed'].includes(cl.status);
    const reason = el('input', { placeholder: 'reason', maxLength: 500 });
    const voider = live
      ? el('span', {}, reason, el('button', {
        type: 'button', class: 'danger',
        onclick: () => voidClaim(cl.claim_id, reason.value),
      }, 'Void'))
      : (cl.void_reason || '');
    body.append(el('tr', { data: { claim: cl.claim_id, status: cl.status } },
      el('td', {}, cl.claim_id), el('td', {}, cl.email), el('td', { class: 'status' }, cl.status),
      el('td', {}, when(cl.claimed_at)), el('td', {}, cl.assigned_code || ''), el('td', {}, voider)));
  }
  $('more-claims').hidden = !r.next;
  $('more-claims').onclick = () => loadClaims(r.next).catch(fail);
}

async function voidClaim(id, reason) {
  if (!reason.trim()) { say('Give a reason to void a claim.', 'error'); return; }
  try {
    await api('POST', '/admin/claims/' + id + '/void', { reason });
    say('Claim ' + id + ' voided: its unit is back in stock.');
    await poll();
    await loadClaims();
  } catch (e) { fail(e); }
}

async function deactivate() {
  try {
    const r = await api('PUT', '/admin/coupons/' + current.id, { status: 'INACTIVE' }, { 'If-Match': etag });
    current = r.data;
    etag = r.etag;
    renderCoupon();
    say(current.code + ' is inactive: no one can claim it.');
  } catch (e) { fail(e); }
}

async function remove() {
  if (!confirm('Delete ' + current.code + '? Its claims stay.')) return;
  try {
    await api('DELETE', '/admin/coupons/' + current.id);
    say('Deleted ' + current.code + '.');
    await reload();
  } catch (e) { fail(e); }
}

// ---- the live chart: the coupon read every second ----

function startPolling() {
  stopPolling();
  poller = setInterval(() => poll().catch(() => {}), 1000);
}

function stopPolling() {
  if (poller) clearInterval(poller);
  poller = null;
}

async function poll() {
  const r = await api('GET', '/admin/coupons/' + current.id);
  if (!$('editor').hidden) return;
  // What is shown is what a change is made against.
  current = r.data;
  etag = r.etag;
  // Claims per second: the claims made since the last poll, over the time since.
  const made = claimsMade(current), at = Date.now();
  const rate = Math.round(10 * (made - last.made) / Math.max(0.1, (at - last.at) / 1000)) / 10;
  const changed = made !== last.made;
  last = { made, at };
  series.push({ rate, remaining: current.available_count });
  if (series.length > POINTS) series.shift();
  renderCoupon();
  drawChart();
  // New claims: show them, unless someone is typing a reason in the table.
  if (changed && !$('claims-table').contains(document.activeElement)) await loadClaims();
}

function drawChart() {
  const canvas = $('chart');
  const g = canvas.getContext('2d');
  const w = canvas.width, h = canvas.height, pad = 30;
  const maxRate = Math.max(1, ...series.map((p) => p.rate));
  const maxLeft = Math.max(1, current.total_count, ...series.map((p) => p.remaining));
  g.clearRect(0, 0, w, h);
  g.strokeStyle = '#ccc';
  g.strokeRect(pad, 5, w - 2 * pad, h - pad - 5);
  g.fillStyle = '#555';
  g.font = '11px sans-serif';
  g.fillText(String(maxRate) + '/s', 2, 14);
  g.fillText(String(maxLeft), w - pad + 3, 14);
  g.fillText('0', 2, h - pad);
  const step = (w - 2 * pad) / POINTS;
  const y = (v, max) => h - pad - (h - pad - 10) * v / max;
  g.fillStyle = '#e8912d';
  series.forEach((p, i) => {
    const top = y(p.rate, maxRate);
    g.fillRect(pad + i * step, top, Math.max(1, step - 1), h - pad - top);
  });
  g.strokeStyle = '#2563eb';
  g.lineWidth = 2;
  g.beginPath();
  series.forEach((p, i) => {
    const x = pad + i * step + step / 2;
    if (i) g.lineTo(x, y(p.remaining, maxLeft)); else g.moveTo(x, y(p.remaining, maxLeft));
  });
  g.stroke();
  g.fillStyle = '#555';
  g.fillText('the last minute, a bar a second', pad + 4, h - pad + 16);
  const now = series[series.length - 1];
  // For a test or a person: the latest and the busiest second.
  canvas.dataset.remaining = now.remaining;
  canvas.dataset.peak = Math.max(0, ...series.map((p) => p.rate));
  canvas.dataset.points = series.length;
  $('chart-now').textContent = '(now: ' + now.rate + ' claims/s, ' + now.remaining + ' left)';
}

// ---- the audit log ----

async function loadAudit(next) {
  const r = await api('GET', next || '/admin/audit?limit=50');
  const body = $('audit-table').tBodies[0];
  if (!next) body.replaceChildren();
  for (const a of r.data) {
    body.append(el('tr', { data: { action: a.action } },
      el('td', {}, when(a.created_at)), el('td', {}, a.actor_id), el('td', {}, a.action),
      el('td', {}, a.coupon_id ?? ''), el('td', {}, a.claim_id ?? ''),
      el('td', { class: 'detail' }, a.detail === null ? '' : JSON.stringify(a.detail))));
  }
  $('more-audit').hidden = !r.next;
  $('more-audit').onclick = () => loadAudit(r.next).catch(fail);
}

// ---- wiring ----

document.addEventListener('DOMContentLoaded', () => {
  $('login-form').addEventListener('submit', login);
  $('logout').addEventListener('click', () => logout('Logged out.'));
  $('filter').addEventListener('submit', (ev) => { ev.preventDefault(); loadCoupons().catch(fail); });
  $('new-coupon').addEventListener('click', () => openEditor(null));
  $('coupon-form').addEventListener('submit', save);
  $('cancel-edit').addEventListener('click', () => (editing ? openCoupon(editing.id) : loadCoupons().then(() => show('coupons'))).catch(fail));
  $('edit').addEventListener('click', () => openEditor(current));
  $('deactivate').addEventListener('click', deactivate);
  $('delete').addEventListener('click', remove);
  $('back').addEventListener('click', () => loadCoupons().then(() => show('coupons')).catch(fail));
  $('reload').addEventListener('click', () => reload().catch(fail));
  for (const b of document.querySelectorAll('#tabs button')) {
    b.addEventListener('click', () => {
      say('');
      const load = b.dataset.view === 'audit' ? loadAudit() : loadCoupons();
      load.then(() => show(b.dataset.view)).catch(fail);
    });
  }
  if (token) start(); else show('login');
});

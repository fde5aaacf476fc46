// The live page: polls /console/api/live every second and redraws the list. Every value
// goes in as text (textContent), never as HTML: names and ids come from the internet.
(function () {
  "use strict";
  var body = document.getElementById("live-keys");
  var form = document.getElementById("live-filters");
  var status = document.getElementById("live-status");
  if (!body || !form) return;
  var seen = null; // keys shown so far, to mark new ones

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function badge(cls, text) { return el("span", "badge " + cls, text); }

  function row(k) {
    var tr = el("tr");
    var id = k.pixel + " " + k.event + " " + k.event_id;
    tr.setAttribute("data-key", id);
    tr.appendChild(el("td", "", k.when));
    tr.appendChild(el("td", "id", k.pixel));
    tr.appendChild(el("td", "id", k.event));
    var idCell = el("td", "id");
    var link = el("a", "", k.event_id);
    link.href = k.href;
    idCell.appendChild(link);
    tr.appendChild(idCell);
    var sources = el("td");
    k.sources.forEach(function (s) {
      sources.appendChild(badge("src-" + s, s));
      sources.appendChild(document.createTextNode(" "));
    });
    if (k.merged) sources.appendChild(badge("ok", "merged"));
    if (k.duplicates) sources.appendChild(badge("warn", k.duplicates + " dup"));
    tr.appendChild(sources);
    var state = el("td");
    state.appendChild(badge("st-" + k.state, k.state.replace("_", " ")));
    tr.appendChild(state);
    var tiktok = [k.code, k.message].filter(function (v) { return v !== null && v !== ""; });
    tr.appendChild(el("td", "id", tiktok.join(" ")));
    if (seen && !seen.has(id)) tr.className = "fresh";
    return tr;
  }

  function draw(keys) {
    var next = new Set();
    var rows = keys.map(function (k) {
      next.add(k.pixel + " " + k.event + " " + k.event_id);
      return row(k);
    });
    if (!rows.length) {
      var empty = el("tr", "empty-row");
      var cell = el("td", "empty", "No recent keys.");
      cell.colSpan = 7;
      empty.appendChild(cell);
      rows.push(empty);
    }
    body.replaceChildren.apply(body, rows);
    seen = next;
  }

  function query() {
    var params = new URLSearchParams();
    ["pixel", "event", "event_id"].forEach(function (name) {
      var value = form.elements[name].value.trim();
      if (value) params.set(name, value);
    });
    return params.toString();
  }

  async function poll() {
    try {
      var response = await fetch("/console/api/live?" + query(), {
        credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" }
      });
      if (response.status === 401) {
        status.textContent = "Logged out: reload the page to log in again.";
        return;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      var data = await response.json();
      draw(data.keys);
      status.textContent = "Live: updated " + new Date().toLocaleTimeString() + " (every second).";
    } catch (err) {
      status.textContent = "Not updating (" + err.message + "); retrying.";
    }
    window.setTimeout(poll, 1000);
  }

  seen = new Set(Array.prototype.map.call(body.querySelectorAll("tr[data-key]"), function (tr) {
    return tr.getAttribute("data-key");
  }));
  window.setTimeout(poll, 1000);
})();

// pool-monitor live page: polls /api/pools, /api/checkouts and /api/blocking; renders the
// blocking tree (while anything blocks) and two tables.
// No framework, no CDN: it must work in an air-gapped cluster behind kubectl port-forward.
// Every value is put in the DOM with textContent (attributes with setAttribute), never as
// HTML: code sites, thread names and query text come from the application and must not
// become markup.
(function () {
  "use strict";
  var refreshMs = parseInt(document.body.getAttribute("data-refresh-ms"), 10) || 2000;
  // The sort lives in the URL (#sort=site, #sort=-age_s) so a link or a reload keeps it.
  var sort = (function () {
    var m = /sort=(-?)([a-z_]+)/.exec(location.hash);
    return m ? { key: m[2], dir: m[1] ? -1 : 1 } : { key: "age_s", dir: -1 };
  })();
  var lastHolds = [];
  // Two loops. The full one (every refreshMs) asks /api/checkouts, which may wait for a
  // fresh PostgreSQL poll, for the holds joined with the server. The fast one (every
  // FAST_MS) asks for the holds only (?server=cached: no wait), so that an ended hold
  // leaves the page within ~0.1 s of leaving the API; its rows keep the server columns
  // of the last full response for the same hold (same process, start and backend).
  var FAST_MS = 100;
  var SERVER_KEYS = ["server_state", "server_xact_age_s", "wait_event", "wait_event_type",
    "application_name", "lock_wait_s", "blocked_by", "server_unknown", "server_as_of",
    "server_sample_age_s", "query"];
  var serverRows = {};

  function holdKey(h) {
    var p = h.process || {};
    return p.hostname + ":" + p.pid + "/" + h.started_at + "/" + h.backend_pid;
  }

  function withServer(rows) {
    return rows.map(function (h) {
      var s = serverRows[holdKey(h)];
      if (!s) return h;
      var out = {};
      Object.keys(h).forEach(function (k) { out[k] = h[k]; });
      SERVER_KEYS.forEach(function (k) { if (k in s) out[k] = s[k]; });
      return out;
    });
  }

  function cell(row, text, cls) {
    var td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  // The hold's OpenTelemetry trace: its first 8 hex digits (the whole id on hover), a link
  // to the tracing backend when the sidecar has --trace-url-template. The schema admits
  // only lowercase hex ids and the sidecar only http(s) templates; checked again here, so
  // that nothing else can become a link (no javascript: URL) or odd text.
  var TRACE_ID = /^[0-9a-f]{32}$/;
  var SAFE_URL = /^https?:\/\//i;

  function traceCell(row, hold) {
    var td = cell(row, "", "trace");
    var el = traceLink(hold);
    if (el) td.appendChild(el);
    return td;
  }

  function traceLink(hold) {
    var id = hold.trace_id;
    if (typeof id !== "string" || !TRACE_ID.test(id)) return null;
    var url = hold.trace_url;
    var el;
    if (typeof url === "string" && SAFE_URL.test(url)) {
      el = document.createElement("a");
      el.setAttribute("href", url);
      el.setAttribute("target", "_blank");
      el.setAttribute("rel", "noopener noreferrer");
    } else {
      el = document.createElement("span");
    }
    el.setAttribute("title", id);
    el.textContent = id.slice(0, 8);
    return el;
  }

  function seconds(v) {
    return typeof v === "number" ? v.toFixed(v < 10 ? 2 : 1) : null;
  }

  function blockedText(hold) {
    return (hold.blocked_by || []).map(function (b) {
      var who = b.holds && b.holds.length ? " " + b.holds[0].pool + " @ " + b.holds[0].site
        : (b.application_name ? " " + b.application_name : "");
      return "pid " + b.pid + who;
    }).join("; ");
  }

  function sortValue(hold, key) {
    if (key === "holder") return hold.task || hold.thread || "";
    if (key === "blocked") return blockedText(hold);
    var v = hold[key];
    return v === null || v === undefined ? "" : v;
  }

  function renderPools(data) {
    var body = document.querySelector("#pools tbody");
    body.textContent = "";
    data.pools.forEach(function (p) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-pool", p.pool);
      cell(tr, p.pool);
      cell(tr, p.used, "num");
      cell(tr, p.idle, "num");
      cell(tr, p.max, "num");
      cell(tr, p.pending, "num");
      cell(tr, p.long_held, "num");
      cell(tr, p.timeouts, "num");
      cell(tr, p.processes, "num");
      var td = cell(tr, "");
      td.textContent = "";
      var bar = document.createElement("div");
      bar.className = "bar";
      var fill = document.createElement("span");
      var ratio = p.max ? Math.min(1, p.used / p.max) : 0;
      fill.style.width = (ratio * 100).toFixed(0) + "%";
      if (ratio >= 1 || p.pending > 0) fill.className = "full";
      bar.appendChild(fill);
      td.appendChild(bar);
      body.appendChild(tr);
    });
  }

  function renderHolds() {
    var holds = lastHolds.slice().sort(function (a, b) {
      var x = sortValue(a, sort.key), y = sortValue(b, sort.key);
      if (typeof x === "number" && typeof y === "number") return (x - y) * sort.dir;
      return String(x).localeCompare(String(y)) * sort.dir;
    });
    var body = document.querySelector("#holds tbody");
    body.textContent = "";
    holds.forEach(function (h) {
      var tr = document.createElement("tr");
      tr.className = "hold" + (h.long_held ? " long" : "") +
        ((h.blocked_by || []).length ? " blocked" : "") + (h.stale ? " stale" : "");
      if (h.backend_pid !== null) tr.setAttribute("data-backend-pid", h.backend_pid);
      cell(tr, h.pool);
      // Ages are the sidecar's, as of the response. A hold its worker has not vouched for
      // lately (stale) may have ended since: say as of when it was last known to be out.
      var age = cell(tr, seconds(h.age_s), "num");
      if (h.stale && typeof h.as_of === "number") {
        var asOf = document.createElement("span");
        asOf.className = "as-of";
        asOf.textContent = " as of " + new Date(h.as_of * 1000).toLocaleTimeString();
        age.appendChild(asOf);
      }
      cell(tr, h.pending ? "(details pending)" : h.site, "site");
      cell(tr, h.task ? h.thread + " / " + h.task : h.thread);
      traceCell(tr, h);
      cell(tr, h.backend_pid, "num");
      // A server row is shown only when it describes this hold; else why not (hover).
      var state = cell(tr, h.server_unknown ? "?" : h.server_state);
      if (h.server_unknown) state.title = h.server_unknown;
      cell(tr, seconds(h.server_xact_age_s), "num");
      cell(tr, h.wait_event_type ? h.wait_event_type + ":" + h.wait_event : null);
      cell(tr, blockedText(h) || null);
      body.appendChild(tr);
    });
    document.getElementById("hold-count").textContent = "(" + holds.length + ")";
    document.querySelectorAll("#holds th").forEach(function (th) {
      var key = th.getAttribute("data-key");
      if (key === sort.key) th.setAttribute("aria-sort", sort.dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    });
  }

  // Who blocks whom (/api/blocking): root blockers first, each with its code site, pool,
  // process and what it is doing, the sessions it blocks indented beneath. Sessions no
  // instrumented pool holds (psql, a migration) are labelled unknown, with the server's
  // application_name. Hidden while nothing blocks.
  function span(parent, text, cls) {
    var el = document.createElement("span");
    el.textContent = text;
    if (cls) el.className = cls;
    parent.appendChild(el);
    return el;
  }

  function plural(n, word) {
    return n + " " + word + (n === 1 ? "" : "s");
  }

  function blockingNode(n, root) {
    var li = document.createElement("li");
    li.className = (root ? "root " : "") + (n.kind === "hold" ? "hold-node" : "unknown");
    li.setAttribute("data-pid", String(n.pid));
    li.setAttribute("data-kind", n.kind);
    var line = document.createElement("div");
    line.className = "line";
    if (n.kind === "hold") {
      span(line, n.site || "(details pending)", "site");
      var p = n.process || {};
      var parts = ["pool " + n.pool, "process " + (p.hostname || "?") + ":" + p.pid];
      var holder = n.task ? n.thread + " / " + n.task : n.thread;
      if (holder) parts.push(holder);
      span(line, " · " + parts.join(" · "));
    } else {
      span(line, "unknown session", "site");
      span(line, n.application_name ? " · application_name " + n.application_name
        : " · no application_name");
      if (n.unknown_reason) line.setAttribute("title", n.unknown_reason);
    }
    span(line, " · pid " + n.pid, "pid");
    span(line, " — " + n.doing, "doing");
    if (n.kind === "hold" && typeof n.age_s === "number") {
      var held = " · held " + seconds(n.age_s) + " s";
      if (typeof n.no_sql_s === "number") held += " (" + seconds(n.no_sql_s) + " s without SQL)";
      span(line, held);
    }
    var trace = traceLink(n);
    if (trace) {
      span(line, " · trace ");
      line.appendChild(trace);
    }
    if (root) {
      var text = "blocks " + plural(n.blocked_transitive, "session") + " (" +
        n.blocked_direct + " directly), longest chain " + n.longest_chain;
      if (n.lock_wait_max_s) text += ", longest wait " + seconds(n.lock_wait_max_s) + " s";
      span(line, text, "count");
    }
    li.appendChild(line);
    var kids = n.children || [];
    if (kids.length || n.more) {
      var ul = document.createElement("ul");
      kids.forEach(function (c) { ul.appendChild(blockingNode(c, false)); });
      if (n.more) {
        var more = document.createElement("li");
        more.className = "more";
        more.textContent = "… and " + plural(n.more, "more blocked session");
        ul.appendChild(more);
      }
      li.appendChild(ul);
    }
    return li;
  }

  function renderBlocking(data) {
    var section = document.getElementById("blocking");
    var tree = document.getElementById("blocking-tree");
    tree.textContent = "";
    var roots = (data && data.roots) || [];
    var cycles = (data && data.cycles) || [];
    if (!roots.length && !cycles.length) {
      section.hidden = true;
      return;
    }
    roots.forEach(function (r) { tree.appendChild(blockingNode(r, true)); });
    if (data.more_roots) {
      var more = document.createElement("li");
      more.className = "more";
      more.textContent = "… and " + plural(data.more_roots, "more root blocker");
      tree.appendChild(more);
    }
    cycles.forEach(function (c) {
      var li = document.createElement("li");
      li.className = "cycle";
      li.textContent = "deadlock between pids " + c.pids.join(", ") + " (PostgreSQL ends it " +
        "after deadlock_timeout), " + plural(c.blocked_transitive, "more session") + " behind it";
      tree.appendChild(li);
    });
    document.getElementById("blocking-count").textContent =
      "(" + plural(data.blocked_backends, "session") + " waiting)";
    section.hidden = false;
  }

  function renderStatus(data) {
    var status = document.getElementById("status");
    var live = data.processes.filter(function (p) { return p.state === "live"; }).length;
    var pg = data.postgres;
    var errors = 0;
    Object.keys(data.snapshot_errors).forEach(function (k) { errors += data.snapshot_errors[k]; });
    var parts = ["updated " + new Date().toLocaleTimeString(), live + " live processes"];
    if (pg.configured) parts.push(pg.up ? "PostgreSQL up" : "PostgreSQL DOWN: " + pg.error);
    if (errors) parts.push(errors + " bad snapshot files");
    if (data.snapshot_dir_error) parts.push(data.snapshot_dir_error);
    status.textContent = parts.join(" · ");
    status.className = pg.configured && !pg.up ? "down" : "";
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", cache: "no-store" }).then(function (r) {
      if (!r.ok) return r.json().then(function (e) { throw new Error(e.error || r.status); });
      return r.json();
    });
  }

  function refresh() {
    // The blocking tree is an extra: the page works without it (an older sidecar).
    var blocking = getJSON("/api/blocking").catch(function () { return null; });
    Promise.all([getJSON("/api/pools"), getJSON("/api/checkouts"), blocking]).then(function (res) {
      renderStatus(res[0]);
      renderBlocking(res[2]);
      renderPools(res[0]);
      serverRows = {};
      res[1].forEach(function (h) { serverRows[holdKey(h)] = h; });
      lastHolds = res[1];
      renderHolds();
      document.body.setAttribute("data-state", "loaded");
    }).catch(function (err) {
      var status = document.getElementById("status");
      status.textContent = "refresh failed: " + err.message;
      status.className = "down";
    }).then(function () {
      setTimeout(refresh, refreshMs);
    });
  }

  function fastRefresh() {
    getJSON("/api/checkouts?server=cached").then(function (rows) {
      if (document.body.getAttribute("data-state") !== "loaded") return;
      lastHolds = withServer(rows);
      renderHolds();
    }).catch(function () {
      // the full loop reports failures
    }).then(function () {
      setTimeout(fastRefresh, FAST_MS);
    });
  }

  document.querySelectorAll("#holds th").forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key");
      sort = { key: key, dir: sort.key === key ? -sort.dir : (key === "age_s" ? -1 : 1) };
      history.replaceState(null, "", "#sort=" + (sort.dir < 0 ? "-" : "") + key);
      renderHolds();
    });
  });
  refresh();
  fastRefresh();
})();

(function () {
  "use strict";
  // The report's one script, allowed by its SHA-256 in the page's CSP. It never parses model text as
  // HTML: every element is built with createElement and every text goes in with textContent.
  var form = document.getElementById("filters");
  var fields = ["variant", "persona", "topic", "dim", "label"];
  var lazy = null; // the session list of a large report, drawn from its JSON a page at a time

  function hash() {
    try { return decodeURIComponent(location.hash.slice(1)); } catch (e) { return ""; }
  }

  function openParents(el) {
    for (var p = el; p; p = p.parentElement) {
      if (p.tagName === "DETAILS") p.open = true;
    }
  }

  // Open the <details> that hold the target of a link (#s-12, #d-persona-0-1), then show it. In a large
  // report a session (#s-12) or pair group (#p-3) is drawn first, on the page of the list that holds it.
  function reveal(id) {
    if (!id) return;
    var el = document.getElementById(id);
    if (!el && lazy) el = lazy.show(id);
    if (!el) return;
    openParents(el);
    el.scrollIntoView();
  }

  // Filters of the session list: variant, persona, topic, dimension and label. A session's labels are
  // tokens "dim:label" and "dim:@outcome" (and "_:@errored" for an errored session).
  function matchLabel(tokens, dim, label) {
    if (!dim && !label) return true;
    return tokens.some(function (t) {
      var i = t.indexOf(":");
      return (!dim || t.slice(0, i) === dim) && (!label || t.slice(i + 1) === label);
    });
  }
  function current() {
    var v = {};
    fields.forEach(function (k) { v[k] = form.elements[k].value; });
    return v;
  }
  function showCount(n) {
    document.getElementById("filter-count").textContent = n + " session(s) shown";
  }

  // A report with every session in the page: hide what the filters exclude.
  function applyInPage() {
    var shown = 0, f = current();
    document.querySelectorAll("details.pair").forEach(function (group) {
      var any = false;
      group.querySelectorAll("article.session").forEach(function (s) {
        var ok = ["variant", "persona", "topic"].every(function (k) {
          return !f[k] || s.dataset[k] === f[k];
        }) && matchLabel((s.dataset.labels || "").split(" "), f.dim, f.label);
        s.hidden = !ok;
        if (ok) { any = true; shown += 1; }
      });
      group.hidden = !any;
    });
    showCount(shown);
  }
  function apply() {
    if (lazy) lazy.filter(); else applyInPage();
  }

  // -- a large report: sessions as JSON, drawn a page of pair groups at a time ---------------------
  //
  // The JSON (id "session-data"): version, page_size (groups per page), dimensions;
  // names.{variant,topic,persona} lists names once; sessions[i] has
  // a (anchor, "s-N"), v/t/p (name indexes), r (repeat), b (1 for the baseline), st (status), f (1 if a
  // judge failed it), n (tutor turns), id (session id), sp (span id), stop, err, l (filter tokens),
  // o ([dim, outcome, label]), u ([role, calls, prompt tokens, completion tokens, seconds]),
  // m ([role, text] or [role, text, tool calls as [name, arguments, result]]), j ([judge, sample, outcome, label, explanation]); groups[k] has a ("p-N"), t, p,
  // r, fl and er (failed and errored sessions), s (session indexes, baseline first), in display order.

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function safeClass(name) {
    return /^[a-z_]+$/.test(name) ? name : "other";
  }
  // Names and model text go in a <bdi>, so a bidi override in them cannot reorder the text around.
  function iso(tag, cls, text) {
    var e = el(tag, cls);
    e.appendChild(el("bdi", null, text));
    return e;
  }
  function tag(outcome, text) {
    return iso("span", "tag " + safeClass(outcome), text);
  }
  // A reply's tool calls ([name, arguments, result] each), under the reply: "tool name(arguments) -> result".
  function toolCalls(calls) {
    var box = el("div", "tool-calls small");
    calls.forEach(function (t) {
      var line = el("div", "tool-call");
      line.appendChild(document.createTextNode("tool "));
      line.appendChild(iso("code", null, t[0]));
      line.appendChild(document.createTextNode("("));
      line.appendChild(el("bdi", "args", t[1]));
      line.appendChild(document.createTextNode(") \u2192 "));
      line.appendChild(el("bdi", "result", t[2]));
      box.appendChild(line);
    });
    return box;
  }

  function LazyList(data) {
    var names = data.names, sessions = data.sessions, groups = data.groups;
    var size = data.page_size || 25;
    var list = document.getElementById("session-list");
    var pagers = Array.prototype.slice.call(document.querySelectorAll("nav.pager"));
    var sessionAt = {}, groupAt = {}, groupOfSession = {};
    var visible = [], page = 0;
    sessions.forEach(function (s, i) { sessionAt[s.a] = i; });
    groups.forEach(function (g, k) {
      groupAt[g.a] = k;
      g.s.forEach(function (i) { groupOfSession[i] = k; });
    });

    function statusTag(s) {
      if (s.st === "errored") return tag("errored", "errored");
      if (s.st !== "completed") return tag("running", s.st);
      return s.f ? tag("fail", "failed") : tag("pass", "passed");
    }

    function article(s) {
      var a = el("article", "session");
      a.id = s.a;
      a.dataset.variant = names.variant[s.v];
      a.dataset.persona = names.persona[s.p];
      a.dataset.topic = names.topic[s.t];
      a.dataset.labels = s.l;
      var head = el("header");
      head.appendChild(statusTag(s));
      head.appendChild(document.createTextNode(" "));
      head.appendChild(iso("b", null, names.variant[s.v] + (s.b ? " (baseline)" : "")));
      head.appendChild(document.createTextNode(" · " + s.n + " tutor turns"));
      var tags = el("div");
      s.o.forEach(function (o) { tags.appendChild(tag(o[1], o[0] + ": " + o[2])); });
      head.appendChild(tags);
      a.appendChild(head);
      var meta = el("div", "small");
      meta.appendChild(document.createTextNode("session "));
      meta.appendChild(el("code", null, s.id));
      meta.appendChild(document.createTextNode(" · span "));
      meta.appendChild(el("code", null, s.sp || "–"));
      var tail = " · stop: " + (s.stop || "–");
      s.u.forEach(function (u) {
        tail += " · " + u[0] + ": " + u[1] + " calls, " + u[2] + "+" + u[3] + " tokens, " + Number(u[4]).toFixed(1) + " s";
      });
      meta.appendChild(document.createTextNode(tail));
      a.appendChild(meta);
      if (s.err) {
        var p = el("p");
        p.appendChild(el("b", null, "Error:"));
        p.appendChild(document.createTextNode(" "));
        p.appendChild(el("bdi", null, s.err));
        a.appendChild(p);
      }
      s.m.forEach(function (m) {
        var d = el("div", "msg " + safeClass(m[0]));
        d.appendChild(el("span", "who", m[0]));
        d.appendChild(el("bdi", null, m[1]));
        a.appendChild(d);
        if (m[2] && m[2].length) a.appendChild(toolCalls(m[2]));
      });
      if (s.j.length) {
        var table = el("table"), tr = el("tr");
        tr.appendChild(el("th", "name", "judge"));
        tr.appendChild(el("th", null, "label"));
        tr.appendChild(el("th", "name", "explanation"));
        table.appendChild(tr);
        s.j.forEach(function (j) {
          var row = el("tr"), cell = el("td");
          row.appendChild(iso("td", "name", j[0] + (j[1] ? " #" + j[1] : "")));
          cell.appendChild(tag(j[2], j[3]));
          row.appendChild(cell);
          row.appendChild(iso("td", "name explain", j[4]));
          table.appendChild(row);
        });
        a.appendChild(table);
      }
      return a;
    }

    // A pair group; its articles are drawn the first time it opens.
    function group(entry) {
      var g = groups[entry.k];
      var d = el("details", "pair");
      d.id = g.a;
      var sum = el("summary");
      if (g.fl) sum.appendChild(tag("fail", g.fl + " failed"));
      if (g.er) sum.appendChild(tag("errored", g.er + " errored"));
      sum.appendChild(iso("b", null, names.topic[g.t]));
      sum.appendChild(document.createTextNode(" · "));
      sum.appendChild(el("bdi", null, names.persona[g.p]));
      sum.appendChild(document.createTextNode(" · repeat " + g.r));
      g.s.forEach(function (i) {
        sum.appendChild(document.createTextNode(" · "));
        sum.appendChild(el("bdi", null, names.variant[sessions[i].v]));
        sum.appendChild(document.createTextNode(" "));
        sum.appendChild(statusTag(sessions[i]));
      });
      d.appendChild(sum);
      d._members = entry.members;
      d.addEventListener("toggle", function () { if (d.open) build(d); });
      return d;
    }
    function build(d) {
      if (d._built) return;
      d._built = true;
      var side = el("div", "side");
      d._members.forEach(function (i) { side.appendChild(article(sessions[i])); });
      d.appendChild(side);
    }

    function render() {
      var pages = Math.max(1, Math.ceil(visible.length / size));
      page = Math.min(Math.max(0, page), pages - 1);
      var from = page * size, to = Math.min(visible.length, from + size);
      var frag = document.createDocumentFragment();
      visible.slice(from, to).forEach(function (entry) { frag.appendChild(group(entry)); });
      list.textContent = "";
      list.appendChild(frag);
      var info = visible.length
        ? "pair groups " + (from + 1) + "–" + to + " of " + visible.length + " · page " + (page + 1) + " of " + pages
        : "no session matches the filters";
      pagers.forEach(function (nav) {
        nav.hidden = false;
        nav.querySelector(".page-info").textContent = info;
        nav.querySelectorAll("button").forEach(function (b) {
          var back = b.dataset.page === "first" || b.dataset.page === "prev";
          b.disabled = back ? page === 0 : page >= pages - 1;
        });
      });
    }

    function filter() {
      var f = form ? current() : {};
      var shown = 0;
      visible = [];
      groups.forEach(function (g, k) {
        var members = g.s.filter(function (i) {
          var s = sessions[i];
          return (!f.variant || names.variant[s.v] === f.variant) && (!f.persona || names.persona[s.p] === f.persona) &&
            (!f.topic || names.topic[s.t] === f.topic) && matchLabel(s.l.split(" "), f.dim, f.label);
        });
        if (members.length) { visible.push({ k: k, members: members }); shown += members.length; }
      });
      page = 0;
      render();
      if (form) showCount(shown);
    }

    // Draw the page that holds a session or pair group, open the group, return the element.
    function show(anchor) {
      var k = anchor in groupAt ? groupAt[anchor] : anchor in sessionAt ? groupOfSession[sessionAt[anchor]] : undefined;
      if (k === undefined) return null;
      var wanted = anchor in sessionAt ? sessionAt[anchor] : null;
      var find = function () {
        for (var n = 0; n < visible.length; n++) {
          if (visible[n].k === k && (wanted === null || visible[n].members.indexOf(wanted) >= 0)) return n;
        }
        return -1;
      };
      var at = find();
      if (at < 0 && form) { // the filters hide it: clear them
        fields.forEach(function (f) { form.elements[f].value = ""; });
        filter();
        at = find();
      }
      if (at < 0) return null;
      page = Math.floor(at / size);
      render();
      var d = document.getElementById(groups[k].a);
      build(d);
      d.open = true;
      return document.getElementById(anchor);
    }

    pagers.forEach(function (nav) {
      nav.addEventListener("click", function (e) {
        var b = e.target.closest("button");
        if (!b) return;
        var last = Math.max(0, Math.ceil(visible.length / size) - 1);
        page = { first: 0, prev: page - 1, next: page + 1, last: last }[b.dataset.page];
        render();
        if (nav === pagers[pagers.length - 1]) pagers[0].scrollIntoView();
      });
    });

    return {
      filter: filter,
      show: show,
      buildPage: function () { list.querySelectorAll("details.pair").forEach(build); }
    };
  }

  var data = document.getElementById("session-data");
  if (data) {
    try {
      lazy = LazyList(JSON.parse(data.textContent));
    } catch (e) {
      var list = document.getElementById("session-list");
      if (list) list.textContent = "The session data of this report could not be read: " + e;
    }
  }

  // #filter?variant=direct&label=@fail sets the filters (a link to a filtered view).
  function filterFromHash(h) {
    var params = new URLSearchParams(h.slice("filter?".length));
    fields.forEach(function (k) { form.elements[k].value = params.get(k) || ""; });
    apply();
    document.getElementById("sessions").scrollIntoView();
  }

  function route() {
    var raw = location.hash.slice(1);
    if (form && raw.indexOf("filter?") === 0) filterFromHash(raw);
    else reveal(hash());
  }

  if (form) {
    form.hidden = false;
    form.addEventListener("change", apply);
    form.addEventListener("reset", function () { window.setTimeout(apply, 0); });
  }
  if (form || lazy) apply();
  window.addEventListener("hashchange", route);
  route();

  // Print every collapsed section (in a large report, the groups of the page shown), then put them back.
  var opened = [];
  window.addEventListener("beforeprint", function () {
    if (lazy) lazy.buildPage();
    document.querySelectorAll("details:not([open])").forEach(function (d) { d.open = true; opened.push(d); });
  });
  window.addEventListener("afterprint", function () {
    opened.forEach(function (d) { d.open = false; });
    opened = [];
  });
})();

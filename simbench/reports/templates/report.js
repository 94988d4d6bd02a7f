(function () {
  "use strict";
  var form = document.getElementById("filters");
  var fields = ["variant", "persona", "topic", "dim", "label"];

  function hash() {
    try { return decodeURIComponent(location.hash.slice(1)); } catch (e) { return ""; }
  }

  // Open the <details> that hold the target of a link (#s-12, #d-persona-0-1), then show it.
  function reveal(id) {
    var el = id && document.getElementById(id);
    if (!el) return;
    for (var p = el; p; p = p.parentElement) {
      if (p.tagName === "DETAILS") p.open = true;
    }
    el.scrollIntoView();
  }

  // Filters of the session list: variant, persona, topic, dimension and label.
  function matchLabel(tokens, dim, label) {
    if (!dim && !label) return true;
    return tokens.some(function (t) {
      var i = t.indexOf(":");
      return (!dim || t.slice(0, i) === dim) && (!label || t.slice(i + 1) === label);
    });
  }
  function apply() {
    var shown = 0;
    var dim = form.elements.dim.value, label = form.elements.label.value;
    document.querySelectorAll("details.pair").forEach(function (group) {
      var any = false;
      group.querySelectorAll("article.session").forEach(function (s) {
        var ok = ["variant", "persona", "topic"].every(function (k) {
          return !form.elements[k].value || s.dataset[k] === form.elements[k].value;
        }) && matchLabel((s.dataset.labels || "").split(" "), dim, label);
        s.hidden = !ok;
        if (ok) { any = true; shown += 1; }
      });
      group.hidden = !any;
    });
    document.getElementById("filter-count").textContent = shown + " session(s) shown";
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
  window.addEventListener("hashchange", route);
  route();

  // Print every collapsed section, then put them back.
  var opened = [];
  window.addEventListener("beforeprint", function () {
    document.querySelectorAll("details:not([open])").forEach(function (d) { d.open = true; opened.push(d); });
  });
  window.addEventListener("afterprint", function () {
    opened.forEach(function (d) { d.open = false; });
    opened = [];
  });
})();

(function () {
  "use strict";
  var DEFAULTS = {q: "", flag: "all", sort: "rank", dir: "asc"};
  var FIRST_DIR = {rank: "asc", score: "desc", path: "asc", flags: "desc"};
  var state = Object.assign({}, DEFAULTS);
  var rows = Array.prototype.slice.call(document.querySelectorAll("tr[data-image-row]"));
  var text = document.getElementById("filter-text");
  var flag = document.getElementById("filter-flag");
  var sort = document.getElementById("sort-key");
  var shown = document.getElementById("shown-count");

  // #q=text&flag=flagged&sort=score&dir=asc; a sort without dir takes that key's first dir
  function readHash() {
    var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    ["q", "flag", "sort"].forEach(function (k) {
      if (params.has(k)) { state[k] = params.get(k); }
    });
    if (!FIRST_DIR.hasOwnProperty(state.sort)) { state.sort = DEFAULTS.sort; }
    var dir = params.get("dir");
    state.dir = dir === "asc" || dir === "desc" ? dir : FIRST_DIR[state.sort];
  }

  function writeHash() {
    var params = new URLSearchParams();
    ["q", "flag", "sort"].forEach(function (k) {
      if (state[k] !== DEFAULTS[k]) { params.set(k, state[k]); }
    });
    if (state.dir !== FIRST_DIR[state.sort]) { params.set("dir", state.dir); }
    var hash = params.toString();
    try {
      history.replaceState(null, "", hash ? "#" + hash : window.location.pathname);
    } catch (error) { /* some browsers refuse this for file:// pages; filtering still works */ }
  }

  function matches(row) {
    var flags = row.dataset.flags ? row.dataset.flags.split(";") : [];
    var ok = row.dataset.status === "ok";
    var f = state.flag;
    if (f === "flagged" && flags.length === 0) { return false; }
    if (f === "unflagged" && (flags.length > 0 || !ok)) { return false; }
    if (f === "not-scored" && ok) { return false; }
    if (["all", "flagged", "unflagged", "not-scored"].indexOf(f) < 0 &&
        flags.indexOf(f) < 0) { return false; }
    var q = state.q.trim().toLowerCase();
    if (q) {
      var hay = [row.dataset.path, row.dataset.patient, row.dataset.embryo].join("\n");
      if (hay.toLowerCase().indexOf(q) < 0) { return false; }
    }
    return true;
  }

  function number(value, missing) {
    var x = parseFloat(value);
    return isNaN(x) ? missing : x;
  }

  function compare(a, b) {
    var s = state.sort, sign = state.dir === "desc" ? -1 : 1, d = 0;
    if (s === "score") {
      var fill = state.dir === "desc" ? -Infinity : Infinity;  // unscored last either way
      d = number(a.dataset.score, fill) - number(b.dataset.score, fill);
    } else if (s === "path") {
      d = a.dataset.path.localeCompare(b.dataset.path);
    } else if (s === "flags") {
      var fa = a.dataset.flags ? a.dataset.flags.split(";").length : 0;
      var fb = b.dataset.flags ? b.dataset.flags.split(";").length : 0;
      d = fa - fb;
    } else {
      d = number(a.dataset.order, 0) - number(b.dataset.order, 0);
    }
    if (d === 0 && s !== "rank") {
      return number(a.dataset.order, 0) - number(b.dataset.order, 0);
    }
    return sign * d;
  }

  function apply() {
    text.value = state.q;
    flag.value = state.flag;
    sort.value = state.sort;
    var visible = 0;
    document.querySelectorAll("tbody[data-cohort-rows]").forEach(function (body) {
      var mine = Array.prototype.slice.call(body.querySelectorAll("tr[data-image-row]"));
      mine.sort(compare).forEach(function (row) { body.appendChild(row); });
      var any = false;
      mine.forEach(function (row) {
        var keep = matches(row);
        row.hidden = !keep;
        if (keep) { visible += 1; any = true; }
      });
      body.closest("section").hidden = !any;
    });
    document.querySelectorAll("th button[data-sort]").forEach(function (button) {
      var on = button.dataset.sort === state.sort;
      button.closest("th").setAttribute("aria-sort",
        on ? (state.dir === "asc" ? "ascending" : "descending") : "none");
    });
    shown.textContent = "Showing " + visible + " of " + rows.length + " images";
    document.body.dataset.visibleRows = String(visible);
  }

  function update(changes) {
    Object.assign(state, changes);
    apply();
    writeHash();
  }

  text.addEventListener("input", function () { update({q: text.value}); });
  flag.addEventListener("change", function () { update({flag: flag.value}); });
  sort.addEventListener("change", function () {
    update({sort: sort.value, dir: FIRST_DIR[sort.value]});
  });
  document.querySelectorAll("th button[data-sort]").forEach(function (button) {
    button.addEventListener("click", function () {
      var key = button.dataset.sort;
      var dir = key === state.sort ? (state.dir === "asc" ? "desc" : "asc") : FIRST_DIR[key];
      update({sort: key, dir: dir});
    });
  });
  window.addEventListener("hashchange", function () {
    state = Object.assign({}, DEFAULTS);
    readHash();
    apply();
  });
  readHash();
  apply();
})();

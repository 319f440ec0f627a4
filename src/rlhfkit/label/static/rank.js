// rlhfkit label: the ranking page. Number keys 1..K (or the "Next best" buttons) place the
// responses from best to worst (the last one is placed for you); Backspace undoes; a ranked
// response selected in the list moves with Up/Down (or its buttons); Enter submits.
(function () {
  "use strict";
  var form = document.getElementById("rank");
  if (!form) return;
  var p = window.RlhfkitLabel.page(form);
  var labels = Array.prototype.map.call(form.querySelectorAll("article.response"), function (a) { return a.dataset.label; });
  var list = document.getElementById("ranking");
  var ranking = [];

  function button(text, title, onClick) {
    var b = document.createElement("button");
    b.type = "button";
    b.className = "secondary";
    b.textContent = text;
    b.title = title;
    b.setAttribute("aria-label", title);
    b.addEventListener("click", onClick);
    return b;
  }

  function move(pos, delta) {
    var to = pos + delta;
    if (to < 0 || to >= ranking.length) return;
    var moved = ranking.splice(pos, 1)[0];
    ranking.splice(to, 0, moved);
    render(to);
  }

  function render(focusPos) {
    list.textContent = "";
    ranking.forEach(function (label, pos) {
      var li = document.createElement("li");
      li.tabIndex = 0;
      li.dataset.label = label;
      var name = document.createElement("span");
      name.textContent = "Response " + label;
      li.appendChild(name);
      li.appendChild(button("↑", "Move " + label + " up", function () { move(pos, -1); }));
      li.appendChild(button("↓", "Move " + label + " down", function () { move(pos, 1); }));
      li.addEventListener("keydown", function (e) {
        if (e.key === "ArrowUp") { e.preventDefault(); e.stopPropagation(); move(pos, -1); }
        else if (e.key === "ArrowDown") { e.preventDefault(); e.stopPropagation(); move(pos, 1); }
      });
      list.appendChild(li);
    });
    labels.forEach(function (label) {
      var article = document.getElementById("response-" + label);
      var pos = ranking.indexOf(label);
      article.classList.toggle("placed", pos >= 0);
      article.querySelector(".place").textContent = pos >= 0 ? "· #" + (pos + 1) : "";
    });
    if (focusPos !== undefined && list.children[focusPos]) list.children[focusPos].focus();
  }

  function place(label) {
    if (ranking.indexOf(label) >= 0 || labels.indexOf(label) < 0) return;
    ranking.push(label);
    if (ranking.length === labels.length - 1) {  // the last one is the worst: no need to ask
      labels.forEach(function (l) { if (ranking.indexOf(l) < 0) ranking.push(l); });
    }
    p.say("");
    render();
  }

  function submit() {
    if (ranking.length !== labels.length) {
      p.say("Rank every response first (press 1–" + labels.length + " from best to worst).", "bad");
      return;
    }
    var flags = {};
    labels.forEach(function (l) { flags[l] = p.flagsOf(l); });
    p.post("/api/rankings", {
      item_id: p.itemId, ranking: ranking.slice(), flags: flags, rating: p.rating(),
      rationale: form.querySelector('textarea[name="rationale"]').value
    }, "item");
  }

  Array.prototype.forEach.call(form.querySelectorAll("button.pick"), function (b) {
    b.addEventListener("click", function () { place(b.dataset.label); });
  });
  document.getElementById("clear").addEventListener("click", function () { ranking = []; render(); });
  form.addEventListener("submit", function (e) { e.preventDefault(); submit(); });
  document.getElementById("skip").addEventListener("click", p.skip);
  p.keys(submit, function (e) {
    var n = parseInt(e.key, 10);
    if (n >= 1 && n <= labels.length) { place(labels[n - 1]); return true; }
    if (e.key === "Backspace" && ranking.length) {
      ranking.splice(ranking.length === labels.length ? -2 : -1);
      render();
      return true;
    }
    return false;
  });
  render();
})();

// rlhfkit label: the pair judging page. Keys: 1-8 choose the point, Enter submits (Ctrl+Enter from
// the rationale box), G/B rate the conversation good/bad, S skips. Shared parts: common.js.
(function () {
  "use strict";
  var form = document.getElementById("judge");
  if (!form) return;
  var p = window.RlhfkitLabel.page(form);

  function choose(n) {
    var input = form.querySelector('input[name="likert"][value="' + n + '"]');
    if (input) { input.checked = true; p.say(""); }
  }

  function submit() {
    var input = form.querySelector('input[name="likert"]:checked');
    if (!input) { p.say("Choose a point from 1 to 8 first.", "bad"); return; }
    p.post("/api/judgments", {
      item_id: p.itemId,
      likert: parseInt(input.value, 10),
      flags: { A: p.flagsOf("A"), B: p.flagsOf("B") }, quality: p.qualityOf(["A", "B"]),
      rating: p.rating(),
      rationale: form.querySelector('textarea[name="rationale"]').value
    }, "item");
  }

  form.addEventListener("submit", function (e) { e.preventDefault(); submit(); });
  document.getElementById("skip").addEventListener("click", p.skip);
  p.keys(submit, function (e) {
    if (e.key >= "1" && e.key <= "8") { choose(e.key); return true; }
    return false;
  });
})();

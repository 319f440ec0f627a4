// rlhfkit label: the live page. Write a user turn (Ctrl+Enter or Send); two replies come back as
// A and B; choose on the 8-point scale (1-8, Enter); the preferred reply continues the conversation.
// Every text is set with textContent: model output stays untrusted text.
(function () {
  "use strict";
  var form = document.getElementById("live");
  if (!form) return;
  var p = window.RlhfkitLabel.page(form);
  var turns = document.getElementById("turns");
  var box = document.getElementById("user-turn");
  var choice = document.getElementById("choice");
  var afterItem = null;
  var shown = null;  // the served turn being judged

  function addTurn(role, text) {
    var div = document.createElement("div");
    div.className = "turn role-" + role;
    var r = document.createElement("div");
    r.className = "role";
    r.textContent = role;
    var t = document.createElement("div");
    t.className = "text";
    t.textContent = text;
    div.appendChild(r);
    div.appendChild(t);
    turns.appendChild(div);
  }

  function showConversation(messages) {
    turns.textContent = "";
    messages.forEach(function (m) { addTurn(m.role, m.content); });
  }

  function reset(keepMessage) {
    shown = null;
    choice.hidden = true;
    Array.prototype.forEach.call(form.querySelectorAll("#choice input"), function (i) { i.checked = false; });
    document.getElementById("send").disabled = false;
    box.disabled = false;
    if (!keepMessage) p.say("");
  }

  function send() {
    var text = box.value;
    if (p.busy || shown) return;
    if (!text.trim()) { p.say("Write a message first.", "bad"); return; }
    p.lock(true);
    p.say("Asking for two replies…");
    p.send("/api/live/turn", { user: text, after_item: afterItem }).then(function (res) {
      p.lock(false);
      if (res.status !== 201) { p.say("No replies: " + ((res.data && res.data.detail) || ("HTTP " + res.status)), "bad"); return; }
      shown = res.data;
      p.itemId = shown.item_id;
      showConversation(shown.conversation);
      shown.responses.forEach(function (r) { document.querySelector("#response-" + r.label + " .text").textContent = r.text; });
      document.getElementById("turn-count").textContent = "Turn " + shown.live.turn;
      box.value = "";
      box.disabled = true;
      document.getElementById("send").disabled = true;
      choice.hidden = false;
      box.blur();
      p.say("Which reply is better? Press 1–8, then Enter.");
    }, function () { p.lock(false); p.say("No replies: the server could not be reached.", "bad"); });
  }

  function submit() {
    if (!shown) { send(); return; }
    var input = form.querySelector('input[name="likert"]:checked');
    if (!input) { p.say("Choose a point from 1 to 8 first.", "bad"); return; }
    p.post("/api/judgments", {
      item_id: shown.item_id, likert: parseInt(input.value, 10),
      flags: { A: p.flagsOf("A"), B: p.flagsOf("B") }, quality: p.qualityOf(["A", "B"]), rating: p.rating(), rationale: ""
    }, "turn", function (stored) {
      var chosen = shown.responses[stored.preferred_position === "left" ? 0 : 1].text;
      addTurn("assistant", chosen);
      afterItem = shown.item_id;
      p.lock(false);
      reset(true);
      p.say("Saved. Your choice continues the conversation: write the next turn.", "good");
      box.focus();
    });
  }

  document.getElementById("send").addEventListener("click", send);
  document.getElementById("restart").addEventListener("click", function () {
    if (shown) p.send("/api/skip", { item_id: shown.item_id });  // the unjudged turn is given back
    afterItem = null;
    turns.textContent = "";
    document.getElementById("turn-count").textContent = "Turn 1";
    reset();
    box.focus();
  });
  form.addEventListener("submit", function (e) { e.preventDefault(); submit(); });
  p.keys(submit, function (e) {
    if (shown && e.key >= "1" && e.key <= "8") {
      var input = form.querySelector('input[name="likert"][value="' + e.key + '"]');
      if (input) { input.checked = true; p.say(""); }
      return true;
    }
    return false;
  });
  box.focus();
})();

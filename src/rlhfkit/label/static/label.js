// rlhfkit label: keyboard and submission for the judging page. No dependencies.
// Keys: 1-8 choose the point, Enter submits (Ctrl+Enter from the rationale box), G/B rate the
// conversation good/bad, S skips. The page posts JSON to the same API as any other client.
(function () {
  "use strict";
  var form = document.getElementById("judge");
  if (!form) return;
  var itemId = parseInt(form.dataset.itemId, 10);
  var message = document.getElementById("message");
  var busy = false;

  function say(text, kind) {
    message.textContent = text;
    message.className = kind || "";
  }

  function choose(n) {
    var input = form.querySelector('input[name="likert"][value="' + n + '"]');
    if (input) { input.checked = true; say(""); }
  }

  function chosen() {
    var input = form.querySelector('input[name="likert"]:checked');
    return input ? parseInt(input.value, 10) : null;
  }

  function setRating(value) {
    var input = form.querySelector('input[name="rating"][value="' + value + '"]');
    if (input) input.checked = !input.checked;
  }

  function flagsOf(label) {
    return Array.prototype.map.call(
      form.querySelectorAll('input[name="flag-' + label + '"]:checked'),
      function (el) { return el.value; });
  }

  function send(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (data) {
        return { status: r.status, data: data };
      });
    });
  }

  function lock(on) {
    busy = on;
    Array.prototype.forEach.call(form.querySelectorAll("button"), function (b) { b.disabled = on; });
  }

  function next() { window.location.assign("/"); }

  function submit() {
    if (busy) return;
    var likert = chosen();
    if (likert === null) { say("Choose a point from 1 to 8 first.", "bad"); return; }
    var rating = form.querySelector('input[name="rating"]:checked');
    var body = {
      item_id: itemId,
      likert: likert,
      flags: { A: flagsOf("A"), B: flagsOf("B") },
      rating: rating ? rating.value : null,
      rationale: form.querySelector('textarea[name="rationale"]').value
    };
    lock(true);
    say("Saving…");
    send("/api/judgments", body).then(function (res) {
      if (res.status === 201 || res.status === 200) {
        say("Saved.", "good");
        next();
      } else if (res.status === 409 && res.data && res.data.judgment) {
        say("You had already judged this item; your first judgment stands.", "bad");
        setTimeout(next, 1200);
      } else {
        say("Not saved: " + ((res.data && res.data.detail) || ("HTTP " + res.status)), "bad");
        lock(false);
      }
    }, function () {
      say("Not saved: the server could not be reached. Press Enter to try again.", "bad");
      lock(false);
    });
  }

  function skip() {
    if (busy) return;
    lock(true);
    send("/api/skip", { item_id: itemId }).then(function (res) {
      if (res.status === 200) { next(); }
      else { say("Could not skip: " + ((res.data && res.data.detail) || res.status), "bad"); lock(false); }
    }, function () { say("Could not skip: the server could not be reached.", "bad"); lock(false); });
  }

  form.addEventListener("submit", function (e) { e.preventDefault(); submit(); });
  document.getElementById("skip").addEventListener("click", skip);

  document.addEventListener("keydown", function (e) {
    var t = e.target;
    var typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && /^(text|number|search)$/.test(t.type)));
    if (e.key === "Enter") {
      if (typing && !(e.ctrlKey || e.metaKey)) return;          // a new line in the rationale
      if (!typing && t && t.tagName === "BUTTON" && t.id === "skip") return;  // Enter on Skip skips
      e.preventDefault();
      submit();
      return;
    }
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key >= "1" && e.key <= "8") { e.preventDefault(); choose(e.key); }
    else if (e.key === "g" || e.key === "G") { e.preventDefault(); setRating("good"); }
    else if (e.key === "b" || e.key === "B") { e.preventDefault(); setRating("bad"); }
    else if (e.key === "s" || e.key === "S") { e.preventDefault(); skip(); }
  });
})();

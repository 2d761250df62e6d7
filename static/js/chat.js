// Chat page behaviour: streaming replies over SSE, Stop (button and Esc),
// the composer (Enter sends, Shift+Enter adds a line), copy buttons, edits.
// Server-rendered HTML stays the source of truth; this file only streams
// text into it and swaps in the server's sanitized HTML when a reply ends.
(function () {
  "use strict";

  // 422 (bad input), the chat's 429 (it says when to retry) and 503 (the
  // database is full or gone) answers carry a readable message for the
  // composer: swap them in (the text stays).
  if (window.htmx) {
    htmx.config.responseHandling = [
      { code: "204", swap: false },
      { code: "[23]..", swap: true },
      { code: "422", swap: true, error: false },
      { code: "429", swap: true, error: false },
      { code: "503", swap: true, error: false },
      { code: "[45]..", swap: false, error: true },
    ];
  }

  const live = new Map(); // reply id -> EventSource

  function csrf() {
    const m = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    if (m) return decodeURIComponent(m[1]);
    const input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  function setBusy(busy) {
    const send = document.getElementById("send-button");
    const stop = document.getElementById("stop-button");
    if (send) send.hidden = busy;
    if (stop) stop.hidden = !busy;
  }

  function scrollToEnd() {
    const thread = document.getElementById("thread");
    if (!thread) return;
    const nearEnd = thread.scrollHeight - thread.scrollTop - thread.clientHeight < 160;
    if (nearEnd) thread.scrollTop = thread.scrollHeight;
  }

  function finish(article, data) {
    const body = article.querySelector(".body");
    body.classList.remove("streaming");
    body.classList.add("md");
    // data.html was rendered and sanitized (nh3) by the server.
    body.innerHTML = data.html || "";
    article.className = article.className.replace(/status-\S+/, "status-" + data.status);
    const note = article.querySelector(".note");
    const labels = { stopped: "Stopped.", interrupted: "Interrupted.", error: "Error: ", blocked: "Blocked: " };
    if (note && data.status !== "complete") {
      note.textContent = (labels[data.status] || data.status) + (data.status === "error" || data.status === "blocked" ? data.error || "" : "");
      note.hidden = false;
    }
    const regen = article.querySelector(".regen");
    if (regen) regen.hidden = false;
    const feedback = article.querySelector("[data-feedback]");
    if (feedback) feedback.hidden = false;
    article.querySelectorAll("[data-when-done]").forEach((el) => { el.hidden = false; });
    article.removeAttribute("data-stream");
    decorateCode(article);
    article.dispatchEvent(new CustomEvent("chat:reply-finished", { bubbles: true }));
  }

  function connect(article) {
    const id = article.dataset.id;
    if (live.has(id) || !article.dataset.stream) return;
    const body = article.querySelector(".body");
    // Resume after the last event the server-rendered text already contains.
    const url = article.dataset.stream + "?last_event_id=" + (article.dataset.streamSeq || "0");
    const source = new EventSource(url);
    live.set(id, source);
    setBusy(true);
    source.addEventListener("token", (e) => {
      body.append(JSON.parse(e.data).t);
      article.dataset.streamSeq = e.lastEventId;
      scrollToEnd();
    });
    source.addEventListener("status", (e) => {
      article.dataset.streamSeq = e.lastEventId;
    });
    const end = (e) => {
      source.close();
      live.delete(id);
      finish(article, JSON.parse(e.data));
      if (live.size === 0) setBusy(false);
      scrollToEnd();
    };
    source.addEventListener("done", end);
    source.addEventListener("error", (e) => {
      // A named "error" event from the server has data; a transport error has
      // none, and EventSource reconnects by itself with Last-Event-ID.
      if (e.data) end(e);
    });
  }

  function connectAll(root) {
    (root || document).querySelectorAll("article.msg[data-stream]").forEach(connect);
  }

  async function stopAll() {
    const articles = document.querySelectorAll("article.msg[data-stream]");
    for (const article of articles) {
      await fetch(article.dataset.stop, { method: "POST", headers: { "X-CSRFToken": csrf() } });
    }
  }

  function decorateCode(root) {
    (root || document).querySelectorAll(".md pre").forEach((pre) => {
      if (pre.querySelector(".copy-code")) return;
      const button = document.createElement("button");
      button.type = "button";
      button.className = "icon copy-code";
      button.textContent = "Copy";
      button.setAttribute("aria-label", "Copy code");
      pre.prepend(button);
    });
  }

  async function copyText(text, button) {
    try {
      await navigator.clipboard.writeText(text);
      const old = button.textContent;
      button.textContent = "Copied";
      setTimeout(() => (button.textContent = old), 1200);
    } catch (err) {
      button.textContent = "Copy failed";
    }
  }

  function validate(form) {
    const textarea = form.querySelector("textarea[name=text]");
    const error = form.querySelector(".composer-error") || document.getElementById("composer-error");
    const max = parseInt(form.dataset.maxChars || document.getElementById("composer")?.dataset.maxChars || "0", 10);
    const text = textarea.value.trim();
    let message = "";
    if (!text) message = "Write a message first.";
    else if (max && text.length > max) message = `The message is ${text.length.toLocaleString()} characters long; the limit is ${max.toLocaleString()}.`;
    if (error) error.textContent = message;
    return !message;
  }

  document.addEventListener("htmx:configRequest", (e) => {
    const form = e.detail.elt.closest && e.detail.elt.closest("form");
    if (form && form.id === "composer" && !validate(form)) e.preventDefault();
  });

  document.addEventListener("htmx:afterRequest", (e) => {
    if (e.detail.elt.id === "composer" && e.detail.successful && e.detail.xhr.status === 200) {
      e.detail.elt.querySelector("textarea[name=text]").value = "";
      document.getElementById("composer-error").textContent = "";
      autosize(e.detail.elt.querySelector("textarea[name=text]"));
    }
  });

  document.addEventListener("htmx:afterSettle", (e) => {
    connectAll(e.detail.elt);
    decorateCode(e.detail.elt);
    if (e.detail.elt.id === "thread") {
      e.detail.elt.scrollTop = e.detail.elt.scrollHeight;
    }
  });

  function autosize(textarea) {
    if (!textarea) return;
    textarea.style.height = "auto";
    textarea.style.height = Math.min(textarea.scrollHeight, 240) + "px";
  }

  document.addEventListener("input", (e) => {
    if (e.target.id === "composer-text") autosize(e.target);
  });

  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && live.size) {
      e.preventDefault();
      stopAll();
      return;
    }
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.target.id === "composer-text") {
      e.preventDefault();
      if (live.size) return; // one reply at a time
      const form = e.target.form;
      if (validate(form)) form.requestSubmit();
    }
  });

  document.addEventListener("click", (e) => {
    const t = e.target;
    if (t.id === "stop-button") {
      stopAll();
    } else if (t.matches(".copy-code")) {
      const code = t.parentElement.querySelector("code");
      copyText(code ? code.innerText : "", t);
    } else if (t.matches("[data-copy-message]")) {
      copyText(t.closest("article").querySelector(".body").innerText, t);
    } else if (t.matches("[data-edit]")) {
      const form = t.closest("article").querySelector(".edit-form");
      form.hidden = false;
      form.querySelector("textarea").focus();
    } else if (t.matches("[data-edit-cancel]")) {
      t.closest(".edit-form").hidden = true;
    }
  });

  // A plain (non-htmx) submit of the composer still validates first.
  document.addEventListener("submit", (e) => {
    if (e.target.id === "composer" && !validate(e.target)) e.preventDefault();
  }, true);

  document.addEventListener("DOMContentLoaded", () => {
    connectAll(document);
    decorateCode(document);
    const thread = document.getElementById("thread");
    if (thread && !location.hash) thread.scrollTop = thread.scrollHeight;
  });
})();

// Documents on the chat page: a chosen file uploads at once, and a reply's
// [n] markers become links to its sources panel (whose entries open the
// passage). The panels arrive as htmx out-of-band swaps (documents/_chat_sources.html).
(function () {
  "use strict";

  function linkCitations(article) {
    const id = article.dataset.id;
    const body = article.querySelector(".body.md");
    if (!id || !body || !article.querySelector(".sources li[id^='src-']")) return;
    const walker = document.createTreeWalker(body, NodeFilter.SHOW_TEXT);
    const nodes = [];
    while (walker.nextNode()) {
      if (/\[\d+\]/.test(walker.currentNode.nodeValue) && !walker.currentNode.parentElement.closest("a, code, pre")) {
        nodes.push(walker.currentNode);
      }
    }
    nodes.forEach((node) => {
      const parts = node.nodeValue.split(/(\[\d+\])/);
      const fragment = document.createDocumentFragment();
      parts.forEach((part) => {
        const m = part.match(/^\[(\d+)\]$/);
        const target = m && document.getElementById(`src-${id}-${m[1]}`);
        if (target) {
          const a = document.createElement("a");
          a.className = "cite";
          a.href = `#src-${id}-${m[1]}`;
          a.textContent = part;
          fragment.append(a);
        } else {
          fragment.append(part);
        }
      });
      node.replaceWith(fragment);
    });
  }

  function linkAll() {
    document.querySelectorAll("article.msg.assistant").forEach(linkCitations);
  }

  document.addEventListener("htmx:oobAfterSwap", linkAll);
  document.addEventListener("htmx:afterSettle", linkAll);

  document.addEventListener("change", (e) => {
    if (e.target.matches("input[type=file][data-auto-submit]") && e.target.files.length) {
      // The form arrives by a swap (#chat-files loads after the page), and htmx
      // binds its hx-post only when that swap settles: a file chosen before
      // then went out as a plain POST, without the CSRF header (a 403 page).
      // htmx.process binds it now, and is a no-op once bound.
      if (window.htmx) htmx.process(e.target.form);
      e.target.form.requestSubmit();
    }
  });
})();

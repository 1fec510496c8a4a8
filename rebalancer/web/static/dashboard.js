// The dashboard's live updates and operator actions. No framework, no build step.
// Live: /events says when the read models moved; the page fetches itself again and swaps
// the elements marked data-live (by id), unless the operator is typing in one of them.
// Actions: a form posts with the operator token in the X-Operator-Token header; the token
// is typed by the operator and kept in this tab's sessionStorage only.
"use strict";

(function () {
  const KEY = "rebalancer-operator-token";
  const live = document.getElementById("live");
  let refreshing = false;
  let again = false;

  function typing() {
    const active = document.activeElement;
    if (active && active.closest("[data-live]") && active.matches("input, select, textarea")) {
      return true;
    }
    for (const input of document.querySelectorAll("[data-live] input:not([type=hidden])")) {
      if (input.value !== input.defaultValue) return true;
    }
    return false;
  }

  async function refresh() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    try {
      if (typing()) { live.textContent = "live (paused while you type)"; return; }
      const response = await fetch(location.href, { headers: { "X-Live": "1" } });
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const element of document.querySelectorAll("[data-live][id]")) {
        const next = fresh.getElementById(element.id);
        if (next && next.innerHTML !== element.innerHTML) {
          const open = new Set([...element.querySelectorAll("details[open]")]
            .map((d) => d.closest("tr") ? [...d.closest("tbody").rows].indexOf(d.closest("tr")) : -1));
          element.replaceWith(next);
          if (open.size) {
            const rows = next.querySelectorAll("tbody tr");
            open.forEach((i) => { if (rows[i]) rows[i].querySelectorAll("details").forEach((d) => { d.open = true; }); });
          }
          prepareForms(next);
        }
      }
      live.textContent = "live";
      document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
    } catch (error) {
      live.textContent = "live (refresh failed)";
    } finally {
      refreshing = false;
      if (again) { again = false; setTimeout(refresh, 200); }
    }
  }

  function connect() {
    const source = new EventSource("/events");
    source.addEventListener("open", () => { live.className = "live on"; live.textContent = "live"; });
    source.addEventListener("change", refresh);
    source.addEventListener("error", () => { live.className = "live off"; live.textContent = "reconnecting"; });
  }

  function token() { return sessionStorage.getItem(KEY) || ""; }

  function say(text, ok) {
    const reply = document.getElementById("reply");
    reply.hidden = false;
    reply.className = ok ? "reply ok" : "reply refused";
    reply.textContent = text;
  }

  function prepareForms(root) {
    for (const form of root.querySelectorAll("form[data-action]")) {
      const field = form.querySelector(".form-token");
      if (field) field.hidden = true; // the header box holds the token when scripts run
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        const button = form.querySelector("button[type=submit]");
        button.disabled = true;
        const headers = { "Accept": "application/json" };
        if (token()) headers["X-Operator-Token"] = token();
        const body = new URLSearchParams(new FormData(form));
        body.delete("token");
        try {
          const response = await fetch(form.action, { method: "POST", headers, body });
          const reply = await response.json();
          if (reply.ok) {
            say(`${form.action.split("/").pop()}: done` + (reply.state ? `, now ${reply.state}` : ""), true);
            for (const input of form.querySelectorAll("input:not([type=hidden])")) input.value = "";
            refresh();
          } else {
            say(`${form.action.split("/").pop()} refused (${reply.error.code}): ${reply.error.message}`, false);
          }
        } catch (error) {
          say("the dashboard did not answer", false);
        } finally {
          button.disabled = false;
        }
      });
    }
  }

  function tokenBox() {
    const box = document.getElementById("token-box");
    if (!box) return;
    const input = document.getElementById("operator-token");
    const forget = document.getElementById("forget-token");
    const show = () => {
      const set = Boolean(token());
      input.hidden = set;
      box.querySelector("button[type=submit]").hidden = set;
      forget.hidden = !set;
      document.body.dataset.token = set ? "set" : "unset";
    };
    box.addEventListener("submit", (event) => {
      event.preventDefault();
      if (input.value) sessionStorage.setItem(KEY, input.value);
      input.value = "";
      show();
    });
    forget.addEventListener("click", () => { sessionStorage.removeItem(KEY); show(); });
    show();
  }

  tokenBox();
  prepareForms(document);
  connect();
})();

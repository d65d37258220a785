// tests/tools/browser/chat.mjs: the chat page of examples/openresty in
// Debian's headless chromium, driven by playwright-core (no browser
// download: the system's chromium).  Used by tests/openresty_browser_spec.lua.
//
//   node chat.mjs URL SCREENSHOT.png "question"
//
// Opens URL, sends the question, records the length of the streamed
// answer at each change of the page until the cost of the answer appears, takes a
// screenshot and prints one JSON line: { lengths (distinct lengths seen,
// in order), text, cost, meta, banner, model }.
import { chromium } from "playwright-core";
import { existsSync } from "node:fs";

const [url, shot, question] = process.argv.slice(2);
const exe = ["/usr/lib/chromium/chromium", "/usr/bin/chromium"].find(p => existsSync(p));
const browser = await chromium.launch({
  executablePath: exe, headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 640 } });
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("model").textContent !== "");
  await page.fill("[data-testid=message]", question);
  // the lengths are recorded inside the page, at each change of the DOM:
  // sampling from here would miss pieces when the machine is slow
  await page.evaluate(() => {
    window.__lengths = [];
    const note = () => {
      const all = document.querySelectorAll("[data-testid=answer]");
      if (all.length === 0) return;
      const n = all[all.length - 1].textContent.length;
      const l = window.__lengths;
      if (l.length === 0 || l[l.length - 1] !== n) l.push(n);
    };
    new MutationObserver(note).observe(document.body, { subtree: true, childList: true, characterData: true });
  });
  await page.click("[data-testid=send]");
  const answer = page.locator("[data-testid=answer]").last();
  await answer.waitFor();
  await page.locator("[data-testid=cost]").last().waitFor({ timeout: 20000 });
  const lengths = await page.evaluate(() => window.__lengths);
  const n = (await answer.textContent()).length;
  if (lengths[lengths.length - 1] !== n) lengths.push(n);
  await page.screenshot({ path: shot, fullPage: true });
  console.log(JSON.stringify({
    lengths,
    text: await answer.textContent(),
    cost: await page.locator("[data-testid=cost]").last().textContent(),
    meta: await page.locator(".bot .meta").last().textContent(),
    banner: await page.locator("[data-testid=simulated]").isVisible(),
    model: await page.locator("#model").textContent(),
  }));
} finally {
  await browser.close();
}

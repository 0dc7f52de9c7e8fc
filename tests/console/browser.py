"""/docs and /console in headless Chromium, step by step as a person would (see run.sh).

Usage: browser.py http://ADDR SCREENSHOT_DIR (the admin console-admin@example.com exists).
Each step prints "ok: ..."; the first missed one raises, and the run exits 1 with a screenshot
of where it stopped.
"""

import json
import sys
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

BASE, SHOTS = sys.argv[1], sys.argv[2]
ADMIN = {"email": "console-admin@example.com", "password": "console-admin-password"}
CODE = "DROP-CI"


def call(method, path, body=None, token=None, headers=None):
    """The API from the test itself: (status, JSON body, headers)."""
    h = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    if token:
        h["Authorization"] = "Bearer " + token
    rq = urllib.request.Request(BASE + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(rq, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), e.headers


def user(email):
    """A registered user's token."""
    creds = {"email": email, "password": "console-user-password"}
    status, body, _ = call("POST", "/register", creds)
    assert status == 201, (status, body)
    status, body, _ = call("POST", "/login", creds)
    assert status == 200, (status, body)
    return body["token"]


def step(text):
    print("ok:", text, flush=True)


options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
            "--disable-background-networking", "--disable-component-update", "--no-first-run"]:
    options.add_argument(arg)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
# The console redraws its tables as claims come in: an element found may be gone a moment later.
wait = WebDriverWait(driver, 20, ignored_exceptions=[StaleElementReferenceException])


def retried(action):
    """Runs `action` again while the elements it found are redrawn under it."""
    for _ in range(10):
        try:
            return action()
        except StaleElementReferenceException:
            time.sleep(0.3)
    return action()


def find(css):
    return wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, css)))


def click(css):
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, css))).click()


def until(what, check):
    """Waits for `check()` to be true, naming `what` if it never is."""
    try:
        return wait.until(lambda _: check())
    except Exception as e:
        raise AssertionError("never: " + what) from e


def browser_errors():
    """Script errors and policy violations the page logged (a 4xx the console expects is
    logged too, as a failed resource, and is not an error here)."""
    bad = []
    for entry in driver.get_log("browser"):
        text = entry["message"]
        if "Content Security Policy" in text or "Uncaught" in text or "Refused" in text:
            bad.append(text)
    return bad


def no_token_in_url(token):
    assert token not in driver.current_url, "the token is in the URL"


def docs():
    status, doc, _ = call("GET", "/openapi.json")
    expected = sum(len(methods) for methods in doc["paths"].values())
    driver.get(BASE + "/docs")
    until(f"Swagger UI renders the {expected} operations",
          lambda: len(driver.find_elements(By.CSS_SELECTOR, ".opblock")) == expected)
    step(f"/docs: Swagger UI rendered all {expected} operations")
    token = user("docs-user@example.com")
    click("button.authorize")
    box = find(".auth-container input")
    box.send_keys(token)
    click(".auth-container button.authorize")
    click("button.btn-done")
    step("/docs: authorized with a bearer token")
    op = find("#operations-default-get_users_me_history")
    op.find_element(By.CSS_SELECTOR, ".opblock-summary-control").click()
    click("#operations-default-get_users_me_history button.try-out__btn")
    click("#operations-default-get_users_me_history button.execute")
    cell = find("#operations-default-get_users_me_history .live-responses-table tr.response .response-col_status")
    until("GET /users/me/history answers 200 in the page", lambda: cell.text.strip() == "200")
    no_token_in_url(token)
    step("/docs: tried GET /users/me/history: 200")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
    driver.save_screenshot(SHOTS + "/docs.png")
    errors = browser_errors()
    assert not errors, errors


def console():
    driver.get(BASE + "/console")
    form = find("#login-form")
    form.find_element(By.NAME, "email").send_keys(ADMIN["email"])
    form.find_element(By.NAME, "password").send_keys(ADMIN["password"])
    form.find_element(By.TAG_NAME, "button").click()
    find("#coupons")
    token = driver.execute_script("return sessionStorage.getItem('coupons.console.token')")
    assert token, "the token is kept in session storage"
    no_token_in_url(token)
    step("/console: logged in as an admin")

    click("#new-coupon")
    form = find("#coupon-form")
    form.find_element(By.NAME, "code").send_keys(CODE)
    form.find_element(By.NAME, "available_count").send_keys("10")
    form.find_element(By.NAME, "name").send_keys("CI drop")
    click("#save")
    until("the new coupon opens", lambda: find("#detail-title").text == CODE + ": CI drop")
    step("/console: created a coupon")

    # Claims through the API, in two bursts a few seconds apart, as a drop would see them.
    status, found, _ = call("GET", "/admin/coupons?q=" + CODE, token=token)
    coupon = found[0]["id"]
    users = [user(f"claimer{i}@example.com") for i in range(4)]
    for burst in (users[:3], users[3:]):
        for t in burst:
            status, body, _ = call("POST", f"/coupons/{coupon}/claim", token=t)
            assert status == 201, (status, body)
        time.sleep(2.5)
    stock = lambda key: find("#detail-stock .stock").get_attribute("data-" + key)
    until("the stock bar shows 6 available, 4 claimed",
          lambda: (stock("available"), stock("claimed")) == ("6", "4"))
    chart = find("#chart")
    until("the chart shows 6 remaining after a busy second",
          lambda: chart.get_attribute("data-remaining") == "6"
          and float(chart.get_attribute("data-peak") or 0) >= 1)
    until("the 4 claims are listed",
          lambda: len(driver.find_elements(By.CSS_SELECTOR, "#claims-table tbody tr")) == 4)
    step("/console: claimed 4 through the API; the stock bar, the chart and the claims moved")
    time.sleep(2)
    driver.save_screenshot(SHOTS + "/console-live.png")

    def void():
        row = find("#claims-table tbody tr")
        row.find_element(By.TAG_NAME, "input").send_keys("CI: a test void")
        row.find_element(By.CSS_SELECTOR, "button.danger").click()
        return row.get_attribute("data-claim")
    claim = retried(void)
    until("the claim shows voided", lambda: driver.find_element(
        By.CSS_SELECTOR, f'#claims-table tr[data-claim="{claim}"]').get_attribute("data-status") == "voided")
    until("the unit is back in the bar", lambda: (stock("available"), stock("voided")) == ("7", "1"))
    step("/console: voided a claim with a reason; its unit is back")

    click("#edit")
    name = find("#coupon-form").find_element(By.NAME, "name")
    name.clear()
    name.send_keys("Mine")
    status, _, _ = call("PUT", f"/admin/coupons/{coupon}", {"name": "Another admin's"}, token=token)
    assert status == 200, status
    click("#save")
    until("the 412 is shown as a change by someone else",
          lambda: "Changed by someone else" in find("#message").text)
    click("#reload")
    until("the form shows the other change",
          lambda: find("#coupon-form").find_element(By.NAME, "name").get_attribute("value") == "Another admin's")
    name = find("#coupon-form").find_element(By.NAME, "name")
    name.clear()
    name.send_keys("Mine, after reload")
    click("#save")
    until("the edit is saved", lambda: find("#detail-title").text == CODE + ": Mine, after reload")
    step("/console: an edit over another admin's change got the 412, reloaded, saved")

    click("#deactivate")
    until("the coupon is inactive",
          lambda: find("#detail-info").get_attribute("data-status") == "INACTIVE")
    status, body, _ = call("POST", f"/coupons/{coupon}/claim", token=user("late@example.com"))
    assert (status, body["code"]) == (409, "inactive"), (status, body)
    step("/console: deactivated; a claim is refused")

    click("#back")
    row = lambda: find(f'#coupon-table tr[data-code="{CODE}"]')
    until("the list shows it inactive, 7 available", lambda: (
        row().find_element(By.CSS_SELECTOR, ".status").text,
        row().find_element(By.CSS_SELECTOR, ".stock").get_attribute("data-available")) == ("INACTIVE", "7"))
    filter_form = find("#filter")
    filter_form.find_element(By.NAME, "q").send_keys("NOPE")
    filter_form.find_element(By.TAG_NAME, "button").click()
    until("a code filter hides it", lambda: not driver.find_elements(
        By.CSS_SELECTOR, f'#coupon-table tr[data-code="{CODE}"]'))
    filter_form.find_element(By.NAME, "q").clear()
    filter_form.find_element(By.TAG_NAME, "button").click()
    find(f'#coupon-table tr[data-code="{CODE}"]')
    driver.save_screenshot(SHOTS + "/console-list.png")
    step("/console: the list shows it inactive with its stock; the code filter works")

    click('#tabs button[data-view="audit"]')
    actions = lambda: [r.get_attribute("data-action")
                       for r in driver.find_elements(By.CSS_SELECTOR, "#audit-table tbody tr")]
    until("the audit log lists the create, the void and the updates",
          lambda: {"coupon.create", "claim.void", "coupon.update"} <= set(actions()))
    driver.save_screenshot(SHOTS + "/console-audit.png")
    step("/console: the audit log")

    click('#tabs button[data-view="coupons"]')
    retried(lambda: find(f'#coupon-table tr[data-code="{CODE}"] a').click())
    find("#detail-title")
    click("#delete")
    wait.until(EC.alert_is_present()).accept()
    until("the coupon shows deleted",
          lambda: find("#detail-info").get_attribute("data-status") == "deleted")
    step("/console: deleted")

    click("#logout")
    find("#login")
    assert driver.execute_script("return sessionStorage.getItem('coupons.console.token')") is None
    step("/console: logged out; the token is gone")
    errors = browser_errors()
    assert not errors, errors


try:
    docs()
    console()
    print("browser.py: every step passed")
except Exception:
    driver.save_screenshot(SHOTS + "/failed.png")
    for entry in driver.get_log("browser"):
        print("browser:", entry["message"], file=sys.stderr)
    raise
finally:
    driver.quit()

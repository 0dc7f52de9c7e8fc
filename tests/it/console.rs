//! The pages for people, as a browser gets them: `/docs` (Swagger UI) and `/console`, every
//! file with its media type and the strict Content-Security-Policy, nothing referenced from
//! elsewhere, no inline script. tests/console/run.sh drives them in Chromium.

use crate::support::{Service, TestDb};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; font-src 'self'; form-action 'self'; \
base-uri 'none'; frame-ancestors 'none'";

/// The URLs in `src="..."` and `href="..."` of an HTML page.
fn links(html: &str) -> Vec<&str> {
    ["src=\"", "href=\""]
        .iter()
        .flat_map(|attr| html.split(attr).skip(1))
        .filter_map(|rest| rest.split('"').next())
        .collect()
}

#[test]
fn the_pages_and_their_files_come_from_the_binary_under_a_strict_policy() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let mut files = Vec::new();
    for (page, title) in [("/docs", "coupons API"), ("/console", "coupons console")] {
        let r = svc.call("GET", page, &[], None);
        assert_eq!(r.status, 200, "{page}");
        assert_eq!(r.headers["content-type"], "text/html; charset=utf-8");
        let html = r.body.as_str().unwrap();
        assert!(html.contains(&format!("<title>{title}</title>")), "{page}");
        // Every script is a file: the policy allows no inline script.
        assert_eq!(
            html.matches("<script").count(),
            html.matches("<script src=\"/").count(),
            "{page}: an inline script"
        );
        assert!(!html.contains("style="), "{page}: an inline style");
        for link in links(html) {
            assert!(
                link.starts_with(page) || link == "data:,",
                "{page} links to {link}"
            );
            if link.starts_with('/') {
                files.push(link.to_owned());
            }
        }
    }
    assert_eq!(files.len(), 8, "{files:?}");
    for path in files
        .iter()
        .map(String::as_str)
        .chain(["/docs", "/console"])
    {
        let r = svc.call("GET", path, &[], None);
        assert_eq!(r.status, 200, "{path}");
        let media = &r.headers["content-type"];
        let expected = match path.rsplit_once('.').map(|(_, ext)| ext) {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("png") => "image/png",
            _ => "text/html; charset=utf-8",
        };
        assert_eq!(media, expected, "{path}");
        assert_eq!(r.headers["content-security-policy"], CSP, "{path}");
        assert_eq!(r.headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(r.headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(r.headers["referrer-policy"], "no-referrer", "{path}");
        // Nothing the scripts and styles of ours load comes from elsewhere.
        if let (Some(text), false) = (r.body.as_str(), path.contains("swagger-ui")) {
            assert!(!text.contains("http://"), "{path}");
            assert!(!text.contains("https://"), "{path}");
        }
    }
    // Swagger UI's settings: this service's document, no online validator, the token in
    // memory only, no settings taken from the URL.
    let init = svc.call("GET", "/docs/swagger-initializer.js", &[], None);
    let init = init.body.as_str().unwrap();
    for setting in [
        r#""url": "/openapi.json""#,
        r#""validatorUrl": "none""#,
        r#""persistAuthorization": false"#,
        r#""queryConfigEnabled": false"#,
    ] {
        assert!(init.contains(setting), "{setting} in {init}");
    }
    // Only the files named, nothing else of the vendored distribution or the disk.
    for path in [
        "/docs/index.html",
        "/docs/oauth2-redirect.html",
        "/docs/nope.js",
        "/docs/..%2FCargo.toml",
        "/console/index.html",
        "/console/../Cargo.toml",
        "/console/",
        "/docs/",
    ] {
        let r = svc.call("GET", path, &[], None);
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.body["code"], "not_found", "{path}");
    }
    let r = svc.call("POST", "/console", &[], None);
    assert_eq!((r.status, r.headers["allow"].as_str()), (405, "GET, HEAD"));
}

/// The console's script keeps its token in session storage (gone with the tab), never in
/// local storage or a URL, and puts what people typed in the page as text.
#[test]
fn the_console_script_keeps_the_token_in_the_tab_and_text_as_text() {
    let js = include_str!("../../bin/server/console/console.js");
    assert!(js.contains("sessionStorage.setItem(KEY, token)"));
    assert!(js.contains("h.Authorization = 'Bearer ' + token"));
    for absent in [
        "localStorage",
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "eval(",
    ] {
        assert!(!js.contains(absent), "console.js uses {absent}");
    }
    assert!(
        !js.contains("token=") && !js.contains("?token"),
        "a token in a URL"
    );
}

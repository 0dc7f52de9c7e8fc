//! The pages for people, served by the binary with nothing fetched from elsewhere: Swagger UI
//! over the OpenAPI document (`/docs`, its files from the pinned `utoipa-swagger-ui`) and the
//! admin console (`/console`, plain HTML, CSS and JavaScript in bin/server/console/, compiled
//! in). The pages hold no secret and need no token: the console's script logs in and calls the
//! API like any client. Their headers, the Content-Security-Policy first, are set here only.

use super::error::ApiError;
use super::http::{App, Reply};
use super::routes::Params;
use coupons::Error;
use std::sync::Arc;
use tiny_http::Request;

type Result<T> = std::result::Result<T, ApiError>;

/// What a page may load and run: scripts, styles, images and API calls from this origin only;
/// no inline script, no eval, no frames, no forms posted elsewhere. Swagger UI's stylesheet
/// draws its icons as `data:` SVG images. Styles stay `'self'` too: both pages set styles only
/// through the DOM (`element.style`), which a policy does not govern.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; font-src 'self'; form-action 'self'; \
base-uri 'none'; frame-ancestors 'none'";

/// The media types of the pages' files (the OpenAPI document lists them).
pub const FILE_TYPES: &str = "text/css,text/javascript,image/png";

/// Swagger UI's files that `/docs` uses (the vendored distribution has more).
const DOCS_FILES: &[&str] = &[
    "swagger-ui.css",
    "index.css",
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "swagger-initializer.js",
    "favicon-32x32.png",
];

/// The console's files, compiled in.
const CONSOLE_FILES: &[(&str, &str)] = &[
    ("console.js", include_str!("console/console.js")),
    ("console.css", include_str!("console/console.css")),
];

const DOCS_HTML: &str = include_str!("console/docs.html");
const CONSOLE_HTML: &str = include_str!("console/index.html");

/// The file names a `{file}` route serves, for the OpenAPI document.
pub fn files(pattern: &str) -> Vec<&'static str> {
    match pattern {
        "/docs/{file}" => DOCS_FILES.to_vec(),
        "/console/{file}" => CONSOLE_FILES.iter().map(|(name, _)| *name).collect(),
        _ => Vec::new(),
    }
}

/// A page or file with its type and the headers every page and file gets.
fn page(body: Vec<u8>, name: &str) -> Reply {
    let media = match name.rsplit_once('.').map_or("", |(_, ext)| ext) {
        "css" => "text/css; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "png" => "image/png",
        _ => "text/html; charset=utf-8",
    };
    let mut reply = Reply::bytes(200, body);
    reply.headers.extend([
        ("Content-Type", media.to_owned()),
        ("Content-Security-Policy", CSP.to_owned()),
        ("X-Content-Type-Options", "nosniff".to_owned()),
        ("X-Frame-Options", "DENY".to_owned()),
        ("Referrer-Policy", "no-referrer".to_owned()),
        // Small next to a coupon drop, and a new binary may bring other files.
        ("Cache-Control", "no-cache".to_owned()),
    ]);
    reply
}

pub fn docs(_: &App, _: &mut Request, _: &str, _: Params) -> Result<Reply> {
    Ok(page(DOCS_HTML.into(), "docs.html"))
}

pub fn console(_: &App, _: &mut Request, _: &str, _: Params) -> Result<Reply> {
    Ok(page(CONSOLE_HTML.into(), "index.html"))
}

/// The file `/docs/{file}` names, only those in [`DOCS_FILES`].
pub fn docs_file(_: &App, _: &mut Request, _: &str, file: Params) -> Result<Reply> {
    let name = match file {
        Params::File(name) if DOCS_FILES.contains(&name.as_str()) => name,
        _ => return Err(ApiError::RouteNotFound),
    };
    let file = utoipa_swagger_ui::serve(&name, Arc::new(swagger_config()))
        .map_err(|e| Error::Internal(format!("Swagger UI's {name}: {e}")))?
        .ok_or(ApiError::RouteNotFound)?;
    Ok(page(file.bytes.into_owned(), &name))
}

pub fn console_file(_: &App, _: &mut Request, _: &str, file: Params) -> Result<Reply> {
    let body = match file {
        Params::File(name) => CONSOLE_FILES.iter().find(|(n, _)| *n == name),
        _ => None,
    };
    let (name, body) = body.ok_or(ApiError::RouteNotFound)?;
    Ok(page(body.as_bytes().to_vec(), name))
}

/// Swagger UI's settings, written into its `swagger-initializer.js` (a file, so the policy
/// allows no inline script). The base layout, as FastAPI's: no bar to load another document.
/// No online validator (it would fetch from validator.swagger.io). The token given to
/// "Authorize" stays in the page's memory: not persisted, never in a URL.
fn swagger_config() -> utoipa_swagger_ui::Config<'static> {
    utoipa_swagger_ui::Config::new(["/openapi.json"])
        .use_base_layout()
        .validator_url("none")
        .query_config_enabled(false)
        .persist_authorization(false)
        .display_request_duration(true)
        .filter(true)
}

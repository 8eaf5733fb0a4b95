//! The guardrail service: a keyword safety classifier answering in the OpenAI
//! moderation format (`POST /v1/moderations`) and as Llama Guard text
//! (`POST /v1/llama-guard`).

use std::sync::Arc;

use hyper::StatusCode;
use tokio::net::TcpListener;

use crate::http::{self, Req};

/// What the classifier calls unsafe (the canary prompts use these).
pub const UNSAFE_WORDS: &[&str] = &["bomb", "weapon", "malware", "poison", "unsafe-canary"];

pub fn is_unsafe(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    UNSAFE_WORDS.iter().any(|w| t.contains(w))
}

fn input_text(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    match &v["input"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => v["messages"].to_string(),
    }
}

pub async fn run(listener: TcpListener) {
    http::serve(
        listener,
        Arc::new(|req: Req| async move {
            let text = input_text(&req.body);
            let bad = is_unsafe(&text);
            match req.path.as_str() {
                "/v1/moderations" => http::json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "id": "modr-ref",
                        "model": "refstack-moderation",
                        "results": [{
                            "flagged": bad,
                            "categories": {"violence": bad, "hate": false},
                            "category_scores": {"violence": if bad { 0.98 } else { 0.01 }, "hate": 0.01}
                        }]
                    }),
                ),
                "/v1/llama-guard" => http::text(
                    StatusCode::OK,
                    "text/plain",
                    if bad { "unsafe\nS1".into() } else { "safe".into() },
                ),
                "/health" => http::json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
                _ => http::json(StatusCode::NOT_FOUND, &serde_json::json!({"error": "no such path"})),
            }
        }),
    )
    .await
}

//! Where each guardrail service keeps its verdict, and how to change it. Pure
//! functions over a response body; the proxy decides which to apply.

use gpuchaos_proto::spec::{JsonPointerPreset, Preset};
use serde_json::Value;

/// A change to the verdict in an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    Flip,
    ForceAllow,
    ForceBlock,
    ShiftScores,
    DropCategories,
}

impl Edit {
    pub fn name(self) -> &'static str {
        match self {
            Edit::Flip => "flip_verdict",
            Edit::ForceAllow => "force_allow",
            Edit::ForceBlock => "force_block",
            Edit::ShiftScores => "shift_scores",
            Edit::DropCategories => "drop_categories",
        }
    }
}

/// Why an edit could not be made to an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// The body is not what the preset expects (not JSON, another shape).
    Unrecognised(String),
    /// The json-pointer preset's pointer matched nothing, or an unknown value.
    Pointer(String),
    /// The preset has nothing this edit could change (Llama Guard has no scores).
    NotApplicable,
}

/// Applies `edit` to `body` as `preset` reads it.
pub fn apply(
    preset: Preset,
    pointer: Option<&JsonPointerPreset>,
    edit: Edit,
    body: &[u8],
) -> Result<Vec<u8>, Miss> {
    if preset == Preset::LlamaGuard {
        return llama_guard(edit, body);
    }
    let mut v: Value = serde_json::from_slice(body)
        .map_err(|e| Miss::Unrecognised(format!("the answer is not JSON: {e}")))?;
    match preset {
        Preset::OpenaiModeration => openai(edit, &mut v)?,
        Preset::Nemo => nemo(edit, &mut v)?,
        Preset::AzureContentSafety => azure(edit, &mut v)?,
        Preset::JsonPointer => {
            let p = pointer.ok_or_else(|| Miss::Pointer("no json_pointer given".into()))?;
            json_pointer(edit, p, &mut v)?
        }
        Preset::LlamaGuard => unreachable!("handled above"),
    }
    serde_json::to_vec(&v).map_err(|e| Miss::Unrecognised(e.to_string()))
}

/// Is this answer a "blocked" verdict? (For the counters; None when unreadable.)
pub fn is_unsafe(preset: Preset, pointer: Option<&JsonPointerPreset>, body: &[u8]) -> Option<bool> {
    if preset == Preset::LlamaGuard {
        let text = llama_text(body)?;
        return Some(text.trim_start().starts_with("unsafe"));
    }
    let v: Value = serde_json::from_slice(body).ok()?;
    match preset {
        Preset::OpenaiModeration => Some(
            v["results"]
                .as_array()?
                .iter()
                .any(|r| r["flagged"].as_bool() == Some(true)),
        ),
        Preset::Nemo => Some(v["status"].as_str()? == "blocked"),
        Preset::AzureContentSafety => Some(
            v["categoriesAnalysis"]
                .as_array()?
                .iter()
                .any(|c| c["severity"].as_u64().unwrap_or(0) >= AZURE_THRESHOLD),
        ),
        Preset::JsonPointer => {
            let p = pointer?;
            let got = v.pointer(&p.pointer)?;
            if *got == p.unsafe_value {
                Some(true)
            } else if *got == p.safe_value {
                Some(false)
            } else {
                None
            }
        }
        Preset::LlamaGuard => None,
    }
}

/// Azure's lowest severity that counts as harmful, and the highest.
const AZURE_THRESHOLD: u64 = 2;
const AZURE_MAX: u64 = 6;

fn openai(edit: Edit, v: &mut Value) -> Result<(), Miss> {
    let results = v["results"]
        .as_array_mut()
        .filter(|r| !r.is_empty())
        .ok_or_else(|| Miss::Unrecognised("no results[] in an OpenAI moderation answer".into()))?;
    for r in results {
        let flagged = r["flagged"]
            .as_bool()
            .ok_or_else(|| Miss::Unrecognised("results[].flagged is not a boolean".into()))?;
        let set = |r: &mut Value, to: bool| {
            r["flagged"] = Value::Bool(to);
            // The categories agree with the flag: none when allowed, the highest
            // scoring one when blocked.
            let top = r["category_scores"].as_object().and_then(|s| {
                s.iter()
                    .max_by(|a, b| {
                        let (x, y) = (a.1.as_f64().unwrap_or(0.0), b.1.as_f64().unwrap_or(0.0));
                        x.total_cmp(&y)
                    })
                    .map(|(k, _)| k.clone())
            });
            if let Some(cats) = r["categories"].as_object_mut() {
                let first = cats.keys().next().cloned();
                for (_, c) in cats.iter_mut() {
                    *c = Value::Bool(false);
                }
                if to && let Some(k) = top.or(first) {
                    cats.insert(k, Value::Bool(true));
                }
            }
        };
        match edit {
            Edit::Flip => set(r, !flagged),
            Edit::ForceAllow => set(r, false),
            Edit::ForceBlock => set(r, true),
            Edit::ShiftScores => {
                let scores = r["category_scores"]
                    .as_object_mut()
                    .ok_or_else(|| Miss::Unrecognised("no category_scores to shift".into()))?;
                for (_, s) in scores.iter_mut() {
                    if let Some(x) = s.as_f64() {
                        *s = serde_json::json!(1.0 - x);
                    }
                }
            }
            Edit::DropCategories => {
                if let Some(o) = r.as_object_mut() {
                    o.remove("categories");
                    o.remove("category_scores");
                    o.remove("category_applied_input_types");
                }
            }
        }
    }
    Ok(())
}

fn nemo(edit: Edit, v: &mut Value) -> Result<(), Miss> {
    let status = v["status"]
        .as_str()
        .ok_or_else(|| Miss::Unrecognised("no status in a NeMo Guardrails answer".into()))?
        .to_string();
    let blocked = status == "blocked";
    let set = |v: &mut Value, to_blocked: bool| {
        let word = if to_blocked { "blocked" } else { "success" };
        v["status"] = Value::String(word.into());
        if let Some(rails) = v["rails_status"].as_object_mut() {
            for (_, r) in rails.iter_mut() {
                r["status"] = Value::String(word.into());
            }
        }
    };
    match edit {
        Edit::Flip => set(v, !blocked),
        Edit::ForceAllow => set(v, false),
        Edit::ForceBlock => set(v, true),
        Edit::ShiftScores => return Err(Miss::NotApplicable),
        Edit::DropCategories => {
            if let Some(o) = v.as_object_mut() {
                o.remove("rails_status");
            }
        }
    }
    Ok(())
}

fn azure(edit: Edit, v: &mut Value) -> Result<(), Miss> {
    let cats = v["categoriesAnalysis"]
        .as_array_mut()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            Miss::Unrecognised("no categoriesAnalysis[] in an Azure Content Safety answer".into())
        })?;
    let harmful = cats
        .iter()
        .any(|c| c["severity"].as_u64().unwrap_or(0) >= AZURE_THRESHOLD);
    let set = |cats: &mut Vec<Value>, to_harmful: bool| {
        for (i, c) in cats.iter_mut().enumerate() {
            c["severity"] = serde_json::json!(if to_harmful && i == 0 { AZURE_MAX } else { 0 });
        }
    };
    match edit {
        Edit::Flip => set(cats, !harmful),
        Edit::ForceAllow => set(cats, false),
        Edit::ForceBlock => set(cats, true),
        Edit::ShiftScores => {
            for c in cats.iter_mut() {
                let s = c["severity"].as_u64().unwrap_or(0);
                c["severity"] = serde_json::json!(AZURE_MAX.saturating_sub(s));
            }
        }
        Edit::DropCategories => cats.clear(),
    }
    Ok(())
}

fn json_pointer(edit: Edit, p: &JsonPointerPreset, v: &mut Value) -> Result<(), Miss> {
    let slot = v
        .pointer_mut(&p.pointer)
        .ok_or_else(|| Miss::Pointer(format!("{} matches nothing in the answer", p.pointer)))?;
    match edit {
        Edit::Flip if *slot == p.unsafe_value => *slot = p.safe_value.clone(),
        Edit::Flip if *slot == p.safe_value => *slot = p.unsafe_value.clone(),
        Edit::Flip => {
            return Err(Miss::Pointer(format!(
                "{} holds {slot}, neither the unsafe value {} nor the safe value {}",
                p.pointer, p.unsafe_value, p.safe_value
            )));
        }
        Edit::ForceAllow => *slot = p.safe_value.clone(),
        Edit::ForceBlock => *slot = p.unsafe_value.clone(),
        Edit::ShiftScores | Edit::DropCategories => return Err(Miss::NotApplicable),
    }
    Ok(())
}

/// The Llama Guard verdict text: the body itself, or an OpenAI-style completion's
/// message (how vLLM serves Llama Guard).
fn llama_text(body: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => v["choices"][0]["message"]["content"]
            .as_str()
            .or(v["choices"][0]["text"].as_str())
            .map(str::to_string),
        Err(_) => std::str::from_utf8(body).ok().map(str::to_string),
    }
}

fn llama_guard(edit: Edit, body: &[u8]) -> Result<Vec<u8>, Miss> {
    let text = llama_text(body).ok_or_else(|| {
        Miss::Unrecognised("neither Llama Guard text nor a completion holding it".into())
    })?;
    let t = text.trim_start();
    let unsafe_ = if t.starts_with("unsafe") {
        true
    } else if t.starts_with("safe") {
        false
    } else {
        return Err(Miss::Unrecognised(format!(
            "Llama Guard text starts with neither safe nor unsafe: {:?}",
            t.chars().take(20).collect::<String>()
        )));
    };
    let codes = t.lines().nth(1).unwrap_or("").trim().to_string();
    let verdict = |to_unsafe: bool| {
        if to_unsafe {
            format!("unsafe\n{}", if codes.is_empty() { "S1" } else { &codes })
        } else {
            "safe".to_string()
        }
    };
    let new = match edit {
        Edit::Flip => verdict(!unsafe_),
        Edit::ForceAllow => verdict(false),
        Edit::ForceBlock => verdict(true),
        Edit::ShiftScores => return Err(Miss::NotApplicable),
        Edit::DropCategories if unsafe_ => "unsafe".to_string(),
        Edit::DropCategories => return Err(Miss::NotApplicable),
    };
    match serde_json::from_slice::<Value>(body) {
        Ok(mut v) => {
            if v["choices"][0]["message"]["content"].is_string() {
                v["choices"][0]["message"]["content"] = Value::String(new);
            } else {
                v["choices"][0]["text"] = Value::String(new);
            }
            serde_json::to_vec(&v).map_err(|e| Miss::Unrecognised(e.to_string()))
        }
        Err(_) => Ok(new.into_bytes()),
    }
}

/// A body that no longer parses: the first half of it, then a stray brace.
pub fn malformed(body: &[u8]) -> Vec<u8> {
    let mut b = body[..body.len() / 2].to_vec();
    b.extend_from_slice(b"\x7b\"\x00");
    b
}

pub fn truncated(body: &[u8]) -> Vec<u8> {
    body[..body.len() / 2].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(v: &[u8]) -> Value {
        serde_json::from_slice(v).unwrap()
    }

    const OPENAI_UNSAFE: &str = r#"{"id":"modr-1","model":"omni-moderation-latest","results":[{"flagged":true,"categories":{"hate":false,"violence":true},"category_scores":{"hate":0.01,"violence":0.97}}]}"#;

    #[test]
    fn openai_moderation() {
        let b = OPENAI_UNSAFE.as_bytes();
        assert_eq!(is_unsafe(Preset::OpenaiModeration, None, b), Some(true));
        let f = apply(Preset::OpenaiModeration, None, Edit::Flip, b).unwrap();
        assert_eq!(j(&f)["results"][0]["flagged"], false);
        assert_eq!(j(&f)["results"][0]["categories"]["violence"], false);
        let back = apply(Preset::OpenaiModeration, None, Edit::Flip, &f).unwrap();
        assert_eq!(j(&back)["results"][0]["flagged"], true);
        assert_eq!(
            j(&back)["results"][0]["categories"]["violence"],
            true,
            "the top category"
        );
        let s = apply(Preset::OpenaiModeration, None, Edit::ShiftScores, b).unwrap();
        assert_eq!(
            j(&s)["results"][0]["category_scores"]["violence"]
                .as_f64()
                .unwrap(),
            1.0 - 0.97
        );
        assert_eq!(j(&s)["results"][0]["flagged"], true, "only the scores move");
        let d = apply(Preset::OpenaiModeration, None, Edit::DropCategories, b).unwrap();
        assert!(j(&d)["results"][0].get("categories").is_none());
        assert!(matches!(
            apply(Preset::OpenaiModeration, None, Edit::Flip, b"{\"x\":1}"),
            Err(Miss::Unrecognised(_))
        ));
    }

    #[test]
    fn llama_guard_text_and_completion() {
        assert_eq!(
            apply(Preset::LlamaGuard, None, Edit::Flip, b"unsafe\nS1,S3").unwrap(),
            b"safe"
        );
        assert_eq!(
            apply(Preset::LlamaGuard, None, Edit::Flip, b"safe").unwrap(),
            b"unsafe\nS1"
        );
        assert_eq!(
            apply(
                Preset::LlamaGuard,
                None,
                Edit::DropCategories,
                b"unsafe\nS1,S3"
            )
            .unwrap(),
            b"unsafe"
        );
        assert_eq!(
            apply(Preset::LlamaGuard, None, Edit::ShiftScores, b"safe"),
            Err(Miss::NotApplicable)
        );
        let c = br#"{"choices":[{"message":{"role":"assistant","content":"unsafe\nS9"}}]}"#;
        assert_eq!(is_unsafe(Preset::LlamaGuard, None, c), Some(true));
        let f = apply(Preset::LlamaGuard, None, Edit::ForceAllow, c).unwrap();
        assert_eq!(j(&f)["choices"][0]["message"]["content"], "safe");
    }

    #[test]
    fn nemo_and_azure() {
        let n = br#"{"status":"blocked","rails_status":{"self check input":{"status":"blocked"}}}"#;
        let f = apply(Preset::Nemo, None, Edit::Flip, n).unwrap();
        assert_eq!(j(&f)["status"], "success");
        assert_eq!(
            j(&f)["rails_status"]["self check input"]["status"],
            "success"
        );
        let a = br#"{"blocklistsMatch":[],"categoriesAnalysis":[{"category":"Hate","severity":0},{"category":"Violence","severity":4}]}"#;
        assert_eq!(is_unsafe(Preset::AzureContentSafety, None, a), Some(true));
        let f = apply(Preset::AzureContentSafety, None, Edit::Flip, a).unwrap();
        assert_eq!(is_unsafe(Preset::AzureContentSafety, None, &f), Some(false));
        let s = apply(Preset::AzureContentSafety, None, Edit::ShiftScores, a).unwrap();
        assert_eq!(j(&s)["categoriesAnalysis"][1]["severity"], 2);
    }

    #[test]
    fn json_pointer_preset_and_its_misses() {
        let p = JsonPointerPreset {
            pointer: "/verdict/label".into(),
            unsafe_value: Value::String("unsafe".into()),
            safe_value: Value::String("ok".into()),
        };
        let b = br#"{"verdict":{"label":"unsafe"}}"#;
        let f = apply(Preset::JsonPointer, Some(&p), Edit::Flip, b).unwrap();
        assert_eq!(j(&f)["verdict"]["label"], "ok");
        let miss = apply(Preset::JsonPointer, Some(&p), Edit::Flip, br#"{"other":1}"#).unwrap_err();
        assert!(
            matches!(&miss, Miss::Pointer(m) if m.contains("matches nothing")),
            "{miss:?}"
        );
        let odd = apply(
            Preset::JsonPointer,
            Some(&p),
            Edit::Flip,
            br#"{"verdict":{"label":"maybe"}}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&odd, Miss::Pointer(m) if m.contains("neither")),
            "{odd:?}"
        );
    }

    #[test]
    fn damage() {
        let b = OPENAI_UNSAFE.as_bytes();
        assert!(serde_json::from_slice::<Value>(&malformed(b)).is_err());
        assert_eq!(truncated(b).len(), b.len() / 2);
    }
}

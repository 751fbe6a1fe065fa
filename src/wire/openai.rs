//! The OpenAI API as clients speak it to the gateway (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`): the fields the gateway reads from a body (`model`, `stream`, `messages` /
//! `prompt` / `input`, `priority`: 400 naming the field), its replies as the backend sent them,
//! errors in the OpenAI envelope. A body that passes is forwarded as sent (only `model` renamed
//! and the gateway's own `priority` removed, in `forward`).

use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::json::{self, Field, Head};
use super::{ClientApi, ClientRequest};
use crate::admission::Priority;
use crate::error::ApiError;
use crate::upstream::Endpoint;

/// See the module doc.
pub(crate) struct OpenAi;

impl ClientApi for OpenAi {
    fn parse(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        named: &mut Option<String>,
    ) -> Result<ClientRequest, ApiError> {
        let f = parse_fields(endpoint, &body, named)?;
        Ok(ClientRequest {
            endpoint,
            model: f.model,
            stream: f.stream,
            priority: f.priority,
            strip_priority: f.strip_priority,
            body,
            cloud_drops: &[],
            reply: None,
            local: None,
            native: None,
        })
    }

    fn error(&self, e: ApiError) -> Response {
        e.into_response()
    }
}

/// The fields of a body, before the headers are added.
struct Fields {
    model: String,
    stream: bool,
    priority: Option<Priority>,
    strip_priority: bool,
}

/// Checks the whole body and the fields the gateway needs.
fn parse_fields(
    endpoint: Endpoint,
    body: &[u8],
    named: &mut Option<String>,
) -> Result<Fields, ApiError> {
    let head = json::check(body)?;
    let model = match &head.model {
        Some(Field::Str(m)) if !m.is_empty() => m.to_string(),
        Some(Field::Str(_)) | None => {
            return Err(ApiError::invalid_value(
                "model",
                "you must provide a model parameter",
            ))
        }
        Some(_) => return Err(ApiError::invalid_value("model", "`model` must be a string")),
    };
    // The rest is checked knowing the model: a refusal names it (`named`), not the success
    // path (no second copy of the name per request).
    let rest = (|| {
        // One rule on every endpoint: `stream` is a boolean (`null` is the same as absent).
        // Embeddings do not stream; their `stream` is forwarded untouched.
        let stream = match head.stream {
            None | Some(Field::Null) => false,
            Some(Field::Bool(b)) => b && endpoint != Endpoint::Embeddings,
            Some(_) => {
                return Err(ApiError::invalid_value(
                    "stream",
                    "`stream` must be a boolean",
                ))
            }
        };
        check_input(endpoint, &head)?;
        // Only the gateway's words (and `null`) are the gateway's `priority`; anything else (vLLM's
        // integer priority, ...) belongs to the backend and is forwarded unchanged.
        let (priority, strip_priority) = match head.priority {
            Some(Field::Str(p)) => match Priority::from_word(&p) {
                Some(p) => (Some(p), true),
                None => (None, false),
            },
            Some(Field::Null) => (None, true),
            _ => (None, false),
        };
        Ok((stream, priority, strip_priority))
    })();
    let (stream, priority, strip_priority) = match rest {
        Ok(r) => r,
        Err(e) => {
            *named = Some(model);
            return Err(e);
        }
    };
    Ok(Fields {
        model,
        stream,
        priority,
        strip_priority,
    })
}

/// The field an endpoint takes its input from: `messages`, `prompt` or `input`.
fn check_input(endpoint: Endpoint, head: &Head) -> Result<(), ApiError> {
    match endpoint {
        Endpoint::ChatCompletions => match &head.messages {
            Some(Field::Array(n)) if *n > 0 => {}
            Some(Field::Array(_)) => {
                return Err(ApiError::invalid_value(
                    "messages",
                    "`messages` must not be empty",
                ))
            }
            None => {
                return Err(ApiError::invalid_value(
                    "messages",
                    "you must provide a messages parameter",
                ))
            }
            Some(_) => {
                return Err(ApiError::invalid_value(
                    "messages",
                    "`messages` must be an array",
                ))
            }
        },
        Endpoint::Completions => {
            if !matches!(&head.prompt, Some(Field::Str(_) | Field::Array(_))) {
                return Err(ApiError::invalid_value(
                    "prompt",
                    "`prompt` must be a string or an array",
                ));
            }
        }
        Endpoint::Embeddings => match &head.input {
            Some(Field::Str(_)) => {}
            Some(Field::Array(n)) if *n > 0 => {}
            _ => {
                return Err(ApiError::invalid_value(
                    "input",
                    "`input` must be a string or a non-empty array",
                ))
            }
        },
        // Not an OpenAI route (a Messages client's request is read by `anthropic`).
        Endpoint::Messages => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::json::{numbers_blanked, MAX_DEPTH};
    use axum::http::StatusCode;

    fn parse(e: Endpoint, s: &str) -> Result<Fields, ApiError> {
        parse_fields(e, s.as_bytes(), &mut None)
    }

    #[test]
    fn numbers_beyond_f64_are_checked_for_their_syntax_only() {
        for n in [
            "1e400",
            "-2.5E-400",
            "18446744073709551615",
            "1e+999",
            "0.1e-99999",
        ] {
            let body = format!(r#"{{"model":"m","messages":[{{"content":[{n}]}}],"x":{n}}}"#);
            assert!(parse(Endpoint::ChatCompletions, &body).is_ok(), "{n}");
        }
        let long = format!(
            r#"{{"model":"m","messages":[{{}}],"x":1{}}}"#,
            "0".repeat(400)
        );
        assert!(parse(Endpoint::ChatCompletions, &long).is_ok());
        for bad in [
            "01", "1e", "-", "1.", ".5", "1e400e1", "1e400.", "--1", "1e400x",
        ] {
            let body = format!(r#"{{"model":"m","messages":[{{}}],"x":{bad},"big":1e400}}"#);
            let e = parse(Endpoint::ChatCompletions, &body).err();
            let code = e.map(|e| e.code().to_string());
            assert_eq!(code.as_deref(), Some("invalid_json"), "{bad}");
        }
        assert_eq!(
            &numbers_blanked(br#"{"a":[1e400,"1e400"],"b":-0.5}"#)[..],
            br#"{"a":[0    ,"1e400"],"b":0   }"#
        );
    }

    #[test]
    fn parse_accepts_a_chat_request() {
        let p = parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"x":{"y":[1]}}"#,
        )
        .unwrap();
        assert_eq!(p.model, "m");
        assert!(p.stream);
    }

    #[test]
    fn parse_names_the_bad_field() {
        let cases = [
            (Endpoint::ChatCompletions, r#"{"messages":[{}]}"#, "model"),
            (
                Endpoint::ChatCompletions,
                r#"{"model":1,"messages":[{}]}"#,
                "model",
            ),
            (Endpoint::ChatCompletions, r#"{"model":"m"}"#, "messages"),
            (
                Endpoint::ChatCompletions,
                r#"{"model":"m","messages":[]}"#,
                "messages",
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"model":"m","messages":"hi"}"#,
                "messages",
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"model":"m","messages":[{}],"stream":"yes"}"#,
                "stream",
            ),
            (Endpoint::Completions, r#"{"model":"m"}"#, "prompt"),
            (Endpoint::Embeddings, r#"{"model":"m","input":[]}"#, "input"),
            (
                Endpoint::Embeddings,
                r#"{"model":"m","input":"x","stream":"yes"}"#,
                "stream",
            ),
        ];
        for (e, body, param) in cases {
            let err = parse(e, body)
                .err()
                .unwrap_or_else(|| panic!("{body} passed"));
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.param, Some(param), "{body}");
        }
    }

    #[test]
    fn parse_rejects_non_objects_and_broken_json() {
        for body in ["[1]", "\"m\"", "{\"model\":", "", "nul"] {
            let err = parse(Endpoint::ChatCompletions, body).err().unwrap();
            assert_eq!(err.code(), "invalid_json", "{body}");
        }
    }

    fn bytes_err(body: &[u8]) -> String {
        let e = parse_fields(Endpoint::ChatCompletions, body, &mut None)
            .err()
            .unwrap_or_else(|| panic!("{} passed", String::from_utf8_lossy(body)));
        assert_eq!(e.code(), "invalid_json");
        e.message.clone()
    }

    #[test]
    fn the_whole_body_is_checked() {
        // Invalid UTF-8 deep in a string, in a key, and a lone surrogate escape.
        let m = bytes_err(
            b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"caf\xe9\"}]}",
        );
        assert!(m.contains("`messages[0].content`"), "{m}");
        assert!(m.contains("column"), "{m}");
        let m = bytes_err(b"{\"model\":\"m\",\"messages\":[{}],\"tools\":{\"k\xff\":1}}");
        assert!(m.contains("`tools`"), "{m}");
        let m = bytes_err(br#"{"model":"m","messages":[{"content":"\ud800"}]}"#);
        assert!(m.contains("`messages[0].content`"), "{m}");
        // Nesting: 64 levels pass, 65 do not.
        let nest = |levels: usize| {
            let inner = levels - 1; // the body object is level 1
            format!(
                r#"{{"model":"m","messages":[{{}}],"x":{}1{}}}"#,
                "[".repeat(inner),
                "]".repeat(inner)
            )
        };
        assert!(parse(Endpoint::ChatCompletions, &nest(MAX_DEPTH)).is_ok());
        let m = bytes_err(nest(MAX_DEPTH + 1).as_bytes());
        assert!(m.contains("nested deeper than 64"), "{m}");
        let deep = format!(
            r#"{{"model":"m","messages":[{}]}}"#,
            "{\"a\":".repeat(200) + "1" + &"}".repeat(200)
        );
        assert!(bytes_err(deep.as_bytes()).contains("nested deeper"));
        // Duplicate top-level keys are named; nested ones are the backend's business.
        let m = bytes_err(br#"{"model":"a","model":"b","messages":[{}]}"#);
        assert!(m.contains("duplicate key `model`"), "{m}");
        // Past the short list of keys too, and a key written with an escape is the same key.
        let many: String = (0..40).map(|i| format!(r#""k{i}":{i},"#)).collect();
        let body = format!(r#"{{"model":"a",{many}"messages":[{{}}]}}"#);
        assert!(parse(Endpoint::ChatCompletions, &body).is_ok());
        let m =
            bytes_err(format!(r#"{{"model":"a",{many}"k\u0033":1,"messages":[{{}}]}}"#).as_bytes());
        assert!(m.contains("duplicate key `k3`"), "{m}");
        let m = bytes_err(br#"{"model":"a","mod\u0065l":"b","messages":[{}]}"#);
        assert!(m.contains("duplicate key `model`"), "{m}");
        assert!(parse(
            Endpoint::ChatCompletions,
            r#"{"model":"a","messages":[{"a":1,"a":2}]}"#
        )
        .is_ok());
        // Escaped text is fine.
        assert!(parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"content":"caf\u00e9 \ud83d\ude00 \"q\""}],"k\u00e9":1}"#
        )
        .is_ok());
    }

    #[test]
    fn only_the_gateways_words_are_its_priority() {
        let p = |prio: &str| {
            let f = parse(
                Endpoint::ChatCompletions,
                &format!(r#"{{"model":"m","messages":[{{}}],"priority":{prio}}}"#),
            )
            .unwrap_or_else(|e| panic!("{prio}: {}", e.message));
            (f.priority, f.strip_priority)
        };
        assert_eq!(p(r#""HIGH""#), (Some(Priority::High), true));
        assert_eq!(p(r#""low""#), (Some(Priority::Low), true));
        assert_eq!(p("null"), (None, true));
        assert_eq!(p("5"), (None, false));
        assert_eq!(p(r#""urgent""#), (None, false));
        assert_eq!(p(r#"{"x":1}"#), (None, false));
    }
}

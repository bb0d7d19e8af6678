//! Token accounting with a real BPE tokenizer (cl100k_base, counted exactly as tiktoken does by
//! our own compact counter, `cl100k.rs`): count_tokens, the input estimate `message_start`
//! reports, and output tokens.

mod cl100k;
#[cfg(test)]
mod cl100k_tests;
mod unicode;

use crate::anthropic::request::{Block, DocumentSource, ImageSource, MessagesRequest, ToolDef};

/// Tokens in a piece of text.
pub fn count_text(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    cl100k::vocabulary().count(text) as u64
}

/// The start of `text` that its first `n` tokens cover (all of it if it has fewer), cut back to
/// a character boundary.
pub fn first_tokens(text: &str, n: usize) -> &str {
    if text.is_empty() {
        return text;
    }
    let mut end = cl100k::vocabulary().prefix_len(text, n);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Per-message framing overhead (role markers), as chat formats add.
const PER_MESSAGE: u64 = 4;
/// Cost of an image whose size cannot be read.
const IMAGE_DEFAULT: u64 = 1_600;

/// Anthropic's image formula: width × height / 750, at most ~1,600 after resizing.
fn image_tokens(source: &ImageSource) -> u64 {
    let ImageSource::Base64 { data, .. } = source else { return IMAGE_DEFAULT };
    use base64::Engine;
    let head: String = data.chars().take(64).collect();
    let cut = head.len() - head.len() % 4;
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&head[..cut]) else {
        return IMAGE_DEFAULT;
    };
    let dims = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() >= 24 {
        Some((
            u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]) as u64,
            u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]) as u64,
        ))
    } else if bytes.starts_with(b"GIF8") && bytes.len() >= 10 {
        Some((
            u16::from_le_bytes([bytes[6], bytes[7]]) as u64,
            u16::from_le_bytes([bytes[8], bytes[9]]) as u64,
        ))
    } else {
        None
    };
    match dims {
        Some((w, h)) if w > 0 && h > 0 => ((w * h).div_ceil(750)).clamp(1, IMAGE_DEFAULT),
        _ => IMAGE_DEFAULT,
    }
}

fn block_tokens(b: &Block) -> u64 {
    match b {
        Block::Text { text } => count_text(text),
        Block::Image { source } => image_tokens(source),
        Block::Document { source, title } => {
            count_text(title.as_deref().unwrap_or(""))
                + match source {
                    DocumentSource::Text { data } => count_text(data),
                    DocumentSource::Content(blocks) => blocks.iter().map(block_tokens).sum(),
                    _ => IMAGE_DEFAULT,
                }
        }
        Block::ToolUse { name, input, .. } => {
            count_text(name) + count_text(&serde_json::Value::Object(input.clone()).to_string()) + 8
        }
        Block::ToolResult { content, .. } => 8 + content.iter().map(block_tokens).sum::<u64>(),
        Block::Thinking { thinking, .. } => count_text(thinking),
        Block::RedactedThinking { data } => (data.len() as u64) / 4,
        Block::SearchResult { source, title, content } => {
            count_text(source) + count_text(title) + content.iter().map(|c| count_text(c)).sum::<u64>()
        }
        Block::ServerTool { json, .. } => count_text(&json.to_string()),
    }
}

/// Input tokens of a request: system, messages, tools and images.
pub fn count_request(req: &MessagesRequest) -> u64 {
    let mut n: u64 = req.system.iter().map(|s| count_text(s)).sum();
    for m in &req.messages {
        n += PER_MESSAGE + m.content.iter().map(block_tokens).sum::<u64>();
    }
    for t in &req.tools {
        n += match t {
            ToolDef::Custom { name, description, input_schema } => {
                count_text(name)
                    + count_text(description.as_deref().unwrap_or(""))
                    + count_text(&input_schema.to_string())
                    + 10
            }
            ToolDef::Server { name, .. } => count_text(name) + 50,
        };
    }
    n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anthropic::request::{ApiVersion, Endpoint, parse_value};
    use serde_json::json;

    #[test]
    fn counts_are_bpe_not_chars() {
        assert_eq!(count_text(""), 0);
        assert_eq!(count_text("hello world"), 2);
        assert!(count_text(&"word ".repeat(1000)) <= 1001);
        let r = parse_value(
            &json!({"model": "m", "system": "Be brief.", "messages": [{"role": "user", "content": "hello world"}],
                "tools": [{"name": "t", "description": "d", "input_schema": {"type": "object"}}]}),
            ApiVersion::default(),
            Endpoint::CountTokens,
        )
        .unwrap();
        let n = count_request(&r);
        assert!(n > 10 && n < 60, "{n}");
    }

    #[test]
    fn png_dimensions() {
        use base64::Engine;
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend_from_slice(&300u32.to_be_bytes());
        png.extend_from_slice(&250u32.to_be_bytes());
        png.extend_from_slice(&[8, 6, 0, 0, 0]);
        let data = base64::engine::general_purpose::STANDARD.encode(&png);
        assert_eq!(image_tokens(&ImageSource::Base64 { media_type: "image/png".into(), data }), 100);
    }
}

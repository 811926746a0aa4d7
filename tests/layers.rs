//! The parts of `src/` and which may use which (the table in `src/lib.rs`): every `crate::`
//! path in a part's non-test code must name the part itself or one it may use, and the pure
//! parts must not reach for the runtime or the MQTT client. A new import against the
//! direction fails here, naming the file, the line and the part it reached.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each part and the parts it may use (besides itself).
const ALLOWED: &[(&str, &[&str])] = &[
    ("core", &[]),
    ("shaping", &["core"]),
    ("buffer", &["core"]),
    ("mqtt", &["core"]),
    ("http", &["core"]),
    ("rule", &["core", "shaping", "buffer"]),
    (
        "ingest",
        &["core", "shaping", "buffer", "mqtt", "http", "rule"],
    ),
    ("delivery", &["core", "shaping", "buffer", "mqtt", "rule"]),
    ("ops", &["core", "http"]),
    (
        "daemon",
        &[
            "core", "shaping", "buffer", "mqtt", "http", "rule", "ingest", "delivery", "ops",
        ],
    ),
    (
        "cli",
        &[
            "core", "shaping", "buffer", "mqtt", "http", "rule", "ingest", "delivery", "ops",
            "daemon",
        ],
    ),
];

/// Crates a pure part must not name: shaping takes `now` as an argument and knows no socket.
const FORBIDDEN_CRATES: &[(&str, &[&str])] = &[
    ("shaping", &["tokio", "rumqttc", "hyper", "aws_sdk_lambda"]),
    (
        "core",
        &["rumqttc", "hyper", "aws_sdk_lambda", "aws_config"],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's code before its unit tests, one entry per line, comments removed.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let mut lines = Vec::new();
    let mut previous_was_cfg_test = false;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if previous_was_cfg_test && trimmed.starts_with("mod ") {
            break;
        }
        previous_was_cfg_test = trimmed == "#[cfg(test)]";
        let code = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        lines.push((i + 1, code.to_owned()));
    }
    lines
}

/// The parts named by `crate::` paths in the code, with the line of each.
fn parts_named(lines: &[(usize, String)]) -> Vec<(usize, String)> {
    // One string, and the line each byte offset is on.
    let mut code = String::new();
    let mut starts = Vec::new();
    for (number, line) in lines {
        starts.push((code.len(), *number));
        code.push_str(line);
        code.push('\n');
    }
    let line_at = |offset: usize| {
        starts
            .iter()
            .rev()
            .find(|(start, _)| *start <= offset)
            .map_or(0, |(_, n)| *n)
    };
    let mut named = Vec::new();
    let mut from = 0;
    while let Some(found) = code[from..].find("crate::") {
        let at = from + found;
        from = at + "crate::".len();
        let preceded_by_ident = code[..at]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if preceded_by_ident {
            continue;
        }
        let rest = &code[from..];
        let Some(group) = rest.strip_prefix('{') else {
            named.push((line_at(at), ident_of(rest)));
            continue;
        };
        // `crate::{a::x, b::{y, z}}`: each item at the top level names a part.
        let mut depth = 0usize;
        let mut item_start = 0;
        let offset = from + 1;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    named.push((
                        line_at(offset + item_start),
                        ident_of(&group[item_start..i]),
                    ));
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    named.push((
                        line_at(offset + item_start),
                        ident_of(&group[item_start..i]),
                    ));
                    item_start = i + 1;
                }
                _ => {}
            }
        }
        from = offset;
    }
    named.retain(|(_, part)| !part.is_empty());
    named
}

fn ident_of(text: &str) -> String {
    text.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

#[test]
fn every_part_uses_only_the_parts_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    let mut seen_parts = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src");
        let mut components = relative.components();
        let first = components
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or_default();
        if components.next().is_none() {
            // lib.rs and main.rs wire the parts together.
            continue;
        }
        let Some(may_use) = allowed.get(first) else {
            problems.push(format!(
                "src/{}: the folder {first:?} is not a part in the table of tests/layers.rs and src/lib.rs",
                relative.display()
            ));
            continue;
        };
        seen_parts += 1;
        let text = std::fs::read_to_string(file).expect("read file");
        let lines = code_lines(&text);
        for (line, part) in parts_named(&lines) {
            if part != first && !may_use.contains(&part.as_str()) {
                problems.push(format!(
                    "src/{}:{line}: the part {first:?} uses {part:?}; it may use only {may_use:?}",
                    relative.display()
                ));
            }
        }
        if let Some((_, crates)) = FORBIDDEN_CRATES.iter().find(|(p, _)| *p == first) {
            for (line, code) in &lines {
                for krate in *crates {
                    if code.contains(&format!("{krate}::")) {
                        problems.push(format!(
                            "src/{}:{line}: the part {first:?} is pure and must not use {krate}",
                            relative.display()
                        ));
                    }
                }
            }
        }
    }
    assert!(seen_parts > 20, "only {seen_parts} files found in parts");
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

#[test]
fn the_reader_finds_grouped_and_inline_paths_and_skips_tests() {
    let text = "use crate::core::config::Config;\nuse crate::{buffer::Queue, mqtt::{a, b}};\nuse crate::{\n    ops::metrics,\n    rule::{Route, x},\n};\nfn f() { let _ = crate::delivery::x(); } // crate::ingest in a comment\nfn g() { mycrate::ops::x(); }\n#[cfg(test)]\nmod tests {\n    use crate::cli;\n}\n";
    let found: Vec<String> = parts_named(&code_lines(text))
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        found,
        ["core", "buffer", "mqtt", "ops", "rule", "delivery"],
        "{found:?}"
    );
}

/// Most lines of non-test code in one source file.
const MAX_FILE_LINES: usize = 600;
/// Most lines of one function, unless the comment above it says why it is one piece.
const MAX_FN_LINES: usize = 80;
/// What the doc comment of a longer function says, followed by why.
const ONE_PIECE: &str = "One piece:";

/// The lines of `text` before its unit tests.
fn before_tests(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .windows(2)
        .position(|w| w[0].trim() == "#[cfg(test)]" && w[1].trim_start().starts_with("mod "))
        .unwrap_or(lines.len());
    lines[..end].to_vec()
}

/// Each function longer than the limit: (first line, name, length), unless its comment says
/// why it is one piece.
fn long_functions(lines: &[&str]) -> Vec<(usize, String, usize)> {
    let mut long = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let mut words = trimmed.split_whitespace().peekable();
        while let Some(word) = words.peek() {
            let qualifier = word.starts_with("pub") || ["const", "async", "unsafe"].contains(word);
            if !qualifier {
                break;
            }
            words.next();
        }
        if words.next() != Some("fn") {
            continue;
        }
        let name: String = words
            .next()
            .unwrap_or_default()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // The signature ends with `{` (a body) or `;` (a declaration in a trait).
        let Some(open) = lines[i..]
            .iter()
            .position(|l| l.trim_end().ends_with('{') || l.trim_end().ends_with(';'))
        else {
            continue;
        };
        if lines[i + open].trim_end().ends_with(';') {
            continue;
        }
        let close = format!("{indent}}}");
        let Some(end) = lines[i + open..].iter().position(|l| *l == close) else {
            continue;
        };
        let length = open + end + 1;
        if length <= MAX_FN_LINES {
            continue;
        }
        let stated = lines[..i]
            .iter()
            .rev()
            .take_while(|l| {
                let t = l.trim_start();
                t.starts_with("///") || t.starts_with("#[") || t.starts_with("//")
            })
            .any(|l| l.contains(ONE_PIECE));
        if !stated {
            long.push((i + 1, name, length));
        }
    }
    long
}

#[test]
fn no_file_or_function_is_longer_than_a_newcomer_can_read() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src").display();
        let text = std::fs::read_to_string(file).expect("read file");
        let lines = before_tests(&text);
        if lines.len() > MAX_FILE_LINES {
            problems.push(format!(
                "src/{relative}: {} lines before its tests (at most {MAX_FILE_LINES}): split it",
                lines.len()
            ));
        }
        for (line, name, length) in long_functions(&lines) {
            problems.push(format!(
                "src/{relative}:{line}: fn {name} is {length} lines (at most {MAX_FN_LINES}): split it, or say why it is one piece in a comment line starting {ONE_PIECE:?} above it"
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

#[test]
fn long_functions_are_found_unless_their_comment_says_why() {
    let body = "    x();\n".repeat(MAX_FN_LINES);
    let text = format!(
        "fn short() {{\n}}\n\npub async fn long(\n    a: u8,\n) {{\n{body}}}\n\n/// {ONE_PIECE} a table.\nfn kept() {{\n{body}}}\n\ntrait T {{\n    fn declared(&self);\n}}\n"
    );
    let lines: Vec<&str> = text.lines().collect();
    let found: Vec<(String, usize)> = long_functions(&lines)
        .into_iter()
        .map(|(_, name, length)| (name, length))
        .collect();
    assert_eq!(found, [("long".to_owned(), MAX_FN_LINES + 4)]);
}

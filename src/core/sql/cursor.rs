//! The parser's cursor over the statement's tokens (`compile.rs` has the grammar): looking
//! ahead, consuming, and the errors that name where in the statement something went wrong.

use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan};

use super::SqlError;
use super::compile::MAX_NODES;

/// The tokens of one statement and how far they are read.
pub(super) struct Parser<'a> {
    pub(super) sql: &'a str,
    pub(super) tokens: Vec<TokenWithSpan>,
    pub(super) next: usize,
    pub(super) depth: usize,
    /// Operators and calls compiled so far (see [`MAX_NODES`]).
    pub(super) nodes: usize,
}

impl Parser<'_> {
    /// Counts one more operator or call; refuses past [`MAX_NODES`].
    pub(super) fn node(&mut self) -> Result<(), SqlError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(SqlError {
                at: at(self.peek().span.start),
                message: format!(
                    "more than {MAX_NODES} operators and function calls; split the rule"
                ),
            });
        }
        Ok(())
    }

    pub(super) fn peek(&self) -> &TokenWithSpan {
        self.peek_at(0)
    }

    pub(super) fn peek_at(&self, ahead: usize) -> &TokenWithSpan {
        static EOF: TokenWithSpan = TokenWithSpan {
            token: Token::EOF,
            span: sqlparser::tokenizer::Span {
                start: Location { line: 0, column: 0 },
                end: Location { line: 0, column: 0 },
            },
        };
        self.tokens.get(self.next + ahead).unwrap_or(&EOF)
    }

    pub(super) fn advance(&mut self) -> TokenWithSpan {
        let token = self.peek().clone();
        self.next += 1;
        token
    }

    pub(super) fn eat(&mut self, token: &Token) -> bool {
        let found = &self.peek().token == token;
        if found {
            self.next += 1;
        }
        found
    }

    pub(super) fn peek_keyword(&self, keyword: Keyword) -> bool {
        matches!(&self.peek().token, Token::Word(w) if w.keyword == keyword && w.quote_style.is_none())
    }

    pub(super) fn eat_keyword(&mut self, keyword: Keyword) -> bool {
        let found = self.peek_keyword(keyword);
        if found {
            self.next += 1;
        }
        found
    }

    pub(super) fn expect(&mut self, token: &Token, what: &str) -> Result<(), SqlError> {
        if self.eat(token) {
            return Ok(());
        }
        Err(self.expected(what))
    }

    pub(super) fn expect_keyword(&mut self, keyword: Keyword, what: &str) -> Result<(), SqlError> {
        if self.eat_keyword(keyword) {
            return Ok(());
        }
        Err(self.expected(what))
    }

    /// "expected X, found Y" at the next token (just after the end at the end).
    pub(super) fn expected(&self, what: &str) -> SqlError {
        let next = self.peek();
        let found = match &next.token {
            Token::EOF => "the end".to_owned(),
            other => other.to_string(),
        };
        SqlError {
            at: at(next.span.start).or_else(|| Some(self.end())),
            message: format!("cannot parse: expected {what}, found {found}"),
        }
    }

    pub(super) fn unsupported_here(&self, what: &str) -> SqlError {
        let start = self.peek().span.start;
        let mut error = unsupported(start, what);
        error.at = error.at.or_else(|| Some(self.end()));
        error
    }

    /// Just after the statement's last character.
    pub(super) fn end(&self) -> (u64, u64) {
        let line = self.sql.split('\n').count() as u64;
        let last = self.sql.rsplit('\n').next().unwrap_or_default();
        (line, last.chars().count() as u64 + 1)
    }

    /// The statement's text from `start` to the end of the last token read.
    pub(super) fn text_since(&self, start: Location) -> String {
        let end = self
            .next
            .checked_sub(1)
            .and_then(|i| self.tokens.get(i))
            .map(|t| t.span.end);
        match (
            offset(self.sql, start),
            end.and_then(|e| offset(self.sql, e)),
        ) {
            (Some(a), Some(b)) if a < b => self.sql[a..b].trim().to_owned(),
            _ => String::new(),
        }
    }
}

/// The byte offset of a 1-based line and column (in characters) of `sql`.
pub(super) fn offset(sql: &str, location: Location) -> Option<usize> {
    let line = usize::try_from(location.line).ok()?;
    let column = usize::try_from(location.column).ok()?.checked_sub(1)?;
    let start: usize = sql
        .split_inclusive('\n')
        .take(line.checked_sub(1)?)
        .map(str::len)
        .sum();
    let rest = sql.get(start..)?;
    match rest.char_indices().nth(column) {
        Some((i, _)) => Some(start + i),
        None => (rest.chars().count() == column).then_some(sql.len()),
    }
}

pub(super) fn unsupported(start: Location, what: &str) -> SqlError {
    SqlError {
        at: at(start),
        message: format!("{what} is not supported on the gateway"),
    }
}

pub(super) fn at(location: Location) -> Option<(u64, u64)> {
    (location.line > 0).then_some((location.line, location.column))
}

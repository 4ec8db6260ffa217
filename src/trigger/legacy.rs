//! The `descripcion` column as the polling script and its triggers wrote it: a JSON object, or
//! the `str()` of a Python dict. One small recursive-descent parser reads both, without `eval`,
//! and yields JSON text with every number kept exactly as written.
//!
//! ```text
//!   {"id": 1, "ok": true, "x": null}                      JSON (text, json or jsonb column)
//!   {'id': 1, 'ok': True, 'x': None, 'tags': ['a', "b"]}  Python dict literal
//!   {'price': Decimal('10.50'), 'at': datetime.datetime(2024, 1, 2, 3, 4, 5)}
//! ```
//!
//! The text is read first as strict JSON; when that fails, as a Python literal; when both fail
//! the error of the reading that got further is reported, with its byte offset.
//!
//! Python support covers what `str(dict)` prints for the values a database row holds:
//! `'single'` and `"double"` quoted strings with Python escapes (`\x41`, `\u00e9`,
//! `\U0001F600`, octal, line continuations), `r''`/`u''`/`b''` prefixes and adjacent-literal
//! concatenation, `True`/`False`/`None`, `inf`/`nan`, ints with `_` separators or `0x`/`0o`/`0b`
//! prefixes, floats such as `1.` and `.5`, lists, tuples, sets and nested dicts, and the reprs of
//! `Decimal`, `UUID`, `datetime.date`/`time`/`datetime` (with `tzinfo` as
//! `datetime.timezone(...)`, psycopg2's `FixedOffsetTimezone` or `ZoneInfo`) and
//! `datetime.timedelta`. Anything else (`<UTC>`, `object()`, a lambda) is an error naming what
//! was found: the row goes to the dead-letter table instead of being guessed at.
//!
//! Values come out as JSON the way PostgreSQL's input functions read them: a `Decimal` is a
//! JSON number, a date or datetime an ISO string, `bytes` a `\x...` hex string (bytea input),
//! `inf` the string `"Infinity"`. Casting to the target column's type happens in SQL.

use std::fmt::Write as _;

/// Nesting deeper than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 64;

/// A `descripcion` that is neither JSON nor a Python literal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} at byte {offset}")]
pub struct ParseError {
    /// Byte offset into the text.
    pub offset: usize,
    /// What was expected or found.
    pub message: String,
}

/// A parsed value. Numbers keep their exact text (already valid JSON).
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    /// `null` / `None`.
    Null,
    /// `true` / `True`.
    Bool(bool),
    /// A number as JSON text (`-1.50`, `1e5`, `12345678901234567890`).
    Number(String),
    /// A string.
    String(String),
    /// A list, tuple or set.
    Array(Vec<Literal>),
    /// A dict, keys in order of appearance.
    Object(Vec<(String, Literal)>),
}

impl Literal {
    /// JSON text, numbers verbatim.
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        self.write_json(&mut out);
        out
    }

    fn write_json(&self, out: &mut String) {
        match self {
            Literal::Null => out.push_str("null"),
            Literal::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Literal::Number(n) => out.push_str(n),
            Literal::String(s) => write_json_string(s, out),
            Literal::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write_json(out);
                }
                out.push(']');
            }
            Literal::Object(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_json_string(k, out);
                    out.push(':');
                    v.write_json(out);
                }
                out.push('}');
            }
        }
    }

    /// The text a key column's value has when compared or logged: strings bare, the rest JSON.
    pub fn as_text(&self) -> String {
        match self {
            Literal::String(s) => s.clone(),
            other => other.to_json(),
        }
    }
}

fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Parses a `descripcion`: JSON first, then a Python literal.
pub fn parse(text: &str) -> Result<Literal, ParseError> {
    let json = Parser::new(text, Dialect::Json).parse_document();
    match json {
        Ok(v) => Ok(v),
        Err(json_err) => match Parser::new(text, Dialect::Python).parse_document() {
            Ok(v) => Ok(v),
            Err(py_err) => Err(if json_err.offset > py_err.offset {
                json_err
            } else {
                py_err
            }),
        },
    }
}

/// Parses a `descripcion` that must be an object (a row): its fields in order.
pub fn parse_row(text: &str) -> Result<Vec<(String, Literal)>, ParseError> {
    match parse(text)? {
        Literal::Object(fields) => Ok(fields),
        other => Err(ParseError {
            offset: 0,
            message: format!(
                "descripcion must be an object of column values, found {}",
                kind_name(&other)
            ),
        }),
    }
}

fn kind_name(v: &Literal) -> &'static str {
    match v {
        Literal::Null => "null",
        Literal::Bool(_) => "a boolean",
        Literal::Number(_) => "a number",
        Literal::String(_) => "a string",
        Literal::Array(_) => "a list",
        Literal::Object(_) => "an object",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    Json,
    Python,
}

/// Intermediate values of Python calls that are not row values themselves.
enum Value {
    Lit(Literal),
    /// A `tzinfo`: a fixed offset in seconds, or a zone name.
    Tz(TzValue),
    /// A `timedelta` in microseconds.
    Delta(i128),
}

enum TzValue {
    Offset(i64),
    Zone(String),
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    dialect: Dialect,
    depth: usize,
}

type PResult<T> = Result<T, ParseError>;

impl<'a> Parser<'a> {
    fn new(text: &'a str, dialect: Dialect) -> Self {
        Parser {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            dialect,
            depth: 0,
        }
    }

    fn err<T>(&self, message: impl Into<String>) -> PResult<T> {
        Err(ParseError {
            offset: self.pos,
            message: message.into(),
        })
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b) = self.peek() {
            if b.is_ascii_whitespace() {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        self.skip_ws();
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, b: u8) -> PResult<()> {
        if self.eat(b) {
            Ok(())
        } else {
            self.err(format!("expected '{}', found {}", b as char, self.found()))
        }
    }

    fn found(&self) -> String {
        match self.text.get(self.pos..).and_then(|s| s.chars().next()) {
            None => "the end of the text".to_string(),
            Some(c) => format!("{c:?}"),
        }
    }

    fn parse_document(&mut self) -> PResult<Literal> {
        let v = self.value()?;
        self.skip_ws();
        if self.pos < self.bytes.len() {
            return self.err(format!("unexpected {} after the value", self.found()));
        }
        Ok(v)
    }

    fn value(&mut self) -> PResult<Literal> {
        match self.any_value()? {
            Value::Lit(l) => Ok(l),
            Value::Tz(_) => self.err("a tzinfo is not a column value"),
            Value::Delta(us) => Ok(Literal::String(interval_text(us))),
        }
    }

    fn enter(&mut self) -> PResult<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.err(format!("nested more than {MAX_DEPTH} levels deep"));
        }
        Ok(())
    }

    fn any_value(&mut self) -> PResult<Value> {
        self.skip_ws();
        let Some(b) = self.peek() else {
            return self.err("expected a value, found the end of the text");
        };
        let py = self.dialect == Dialect::Python;
        match b {
            b'{' => {
                self.enter()?;
                let v = self.object()?;
                self.depth -= 1;
                Ok(Value::Lit(v))
            }
            b'[' => {
                self.enter()?;
                self.pos += 1;
                let v = self.sequence(b']')?;
                self.depth -= 1;
                Ok(Value::Lit(Literal::Array(v)))
            }
            b'(' if py => {
                self.enter()?;
                self.pos += 1;
                let v = self.sequence(b')')?;
                self.depth -= 1;
                Ok(Value::Lit(Literal::Array(v)))
            }
            b'"' => Ok(Value::Lit(Literal::String(self.strings()?))),
            b'\'' if py => Ok(Value::Lit(self.python_string_value()?)),
            b'-' | b'+' | b'0'..=b'9' | b'.' => self.number(),
            b if b.is_ascii_alphabetic() || b == b'_' => self.word(),
            _ => self.err(format!("expected a value, found {}", self.found())),
        }
    }

    /// `{` already seen as next byte: a dict (or, in Python, a set).
    fn object(&mut self) -> PResult<Literal> {
        self.pos += 1;
        let mut fields: Vec<(String, Literal)> = Vec::new();
        if self.eat(b'}') {
            return Ok(Literal::Object(fields));
        }
        loop {
            let key_at = {
                self.skip_ws();
                self.pos
            };
            let key = self.value()?;
            if fields.is_empty() && self.dialect == Dialect::Python {
                self.skip_ws();
                if matches!(self.peek(), Some(b',') | Some(b'}')) {
                    // A set literal: `{1, 2}`.
                    let mut items = vec![key];
                    if self.eat(b',') {
                        items.extend(self.sequence(b'}')?);
                    } else {
                        self.expect(b'}')?;
                    }
                    return Ok(Literal::Array(items));
                }
            }
            let key = match key {
                Literal::String(s) => s,
                Literal::Number(n) if self.dialect == Dialect::Python => n,
                Literal::Bool(b) if self.dialect == Dialect::Python => b.to_string(),
                Literal::Null if self.dialect == Dialect::Python => "null".to_string(),
                other => {
                    self.pos = key_at;
                    return self.err(format!(
                        "a key must be a string, found {}",
                        kind_name(&other)
                    ));
                }
            };
            self.expect(b':')?;
            let value = self.value()?;
            fields.push((key, value));
            if self.eat(b',') {
                if self.dialect == Dialect::Python && self.eat(b'}') {
                    break;
                }
                continue;
            }
            self.expect(b'}')?;
            break;
        }
        Ok(Literal::Object(fields))
    }

    /// Items up to `close` (the opening bracket consumed). Python allows a trailing comma.
    fn sequence(&mut self, close: u8) -> PResult<Vec<Literal>> {
        let mut items = Vec::new();
        if self.eat(close) {
            return Ok(items);
        }
        loop {
            items.push(self.value()?);
            if self.eat(b',') {
                if self.dialect == Dialect::Python && self.eat(close) {
                    break;
                }
                continue;
            }
            self.expect(close)?;
            break;
        }
        Ok(items)
    }

    /// One or more adjacent string literals (Python concatenates them).
    fn strings(&mut self) -> PResult<String> {
        match self.dialect {
            Dialect::Json => self.json_string(),
            Dialect::Python => match self.python_string_value()? {
                Literal::String(s) => Ok(s),
                _ => self.err("expected a text string, found bytes"),
            },
        }
    }

    fn json_string(&mut self) -> PResult<String> {
        // At the opening quote.
        self.pos += 1;
        let mut out = String::new();
        loop {
            let rest = self.text.get(self.pos..).unwrap_or("");
            let Some(c) = rest.chars().next() else {
                return self.err("unterminated string");
            };
            match c {
                '"' => {
                    self.pos += 1;
                    return Ok(out);
                }
                '\\' => {
                    self.pos += 1;
                    let Some(e) = self.peek() else {
                        return self.err("unterminated string");
                    };
                    self.pos += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex_digits(4)?;
                            let c = if (0xD800..0xDC00).contains(&hi) {
                                if self.text.get(self.pos..self.pos + 2) != Some("\\u") {
                                    return self.err("unpaired surrogate in \\u escape");
                                }
                                self.pos += 2;
                                let lo = self.hex_digits(4)?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return self.err("unpaired surrogate in \\u escape");
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else {
                                hi
                            };
                            match char::from_u32(c) {
                                Some(c) => out.push(c),
                                None => return self.err("invalid \\u escape"),
                            }
                        }
                        _ => {
                            self.pos -= 1;
                            return self.err(format!("invalid escape \\{}", e as char));
                        }
                    }
                }
                c if (c as u32) < 0x20 => return self.err("control character in a string"),
                c => {
                    out.push(c);
                    self.pos += c.len_utf8();
                }
            }
        }
    }

    fn hex_digits(&mut self, n: usize) -> PResult<u32> {
        let Some(digits) = self.text.get(self.pos..self.pos + n) else {
            return self.err(format!("expected {n} hexadecimal digits"));
        };
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return self.err(format!("expected {n} hexadecimal digits"));
        }
        let v = u32::from_str_radix(digits, 16).map_err(|_| ParseError {
            offset: self.pos,
            message: "bad hexadecimal digits".into(),
        })?;
        self.pos += n;
        Ok(v)
    }

    /// Python string or bytes literal(s), with prefixes and implicit concatenation.
    fn python_string_value(&mut self) -> PResult<Literal> {
        let mut text = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        let mut kind: Option<bool> = None; // Some(true) = bytes
        loop {
            self.skip_ws();
            let start = self.pos;
            let (raw, is_bytes) = self.string_prefix();
            if !matches!(self.peek(), Some(b'\'') | Some(b'"')) {
                self.pos = start;
                break;
            }
            if kind.is_some_and(|k| k != is_bytes) {
                return self.err("cannot mix bytes and text literals");
            }
            kind = Some(is_bytes);
            let piece = self.python_quoted(raw, is_bytes)?;
            match piece {
                Piece::Text(s) => text.push_str(&s),
                Piece::Bytes(b) => bytes.extend(b),
            }
        }
        match kind {
            None => self.err(format!("expected a string, found {}", self.found())),
            Some(false) => Ok(Literal::String(text)),
            Some(true) => {
                let mut hex = String::with_capacity(2 + bytes.len() * 2);
                hex.push_str("\\x");
                for b in bytes {
                    let _ = write!(hex, "{b:02x}");
                }
                Ok(Literal::String(hex))
            }
        }
    }

    /// Consumes a string prefix (`r`, `u`, `b`, `rb`, `br`, any case) directly before a quote.
    fn string_prefix(&mut self) -> (bool, bool) {
        let mut raw = false;
        let mut is_bytes = false;
        let start = self.pos;
        for _ in 0..2 {
            match self.peek().map(|b| b.to_ascii_lowercase()) {
                Some(b'r') => raw = true,
                Some(b'b') => is_bytes = true,
                Some(b'u') => {}
                _ => break,
            }
            self.pos += 1;
        }
        if !matches!(self.peek(), Some(b'\'') | Some(b'"')) {
            self.pos = start;
            return (false, false);
        }
        (raw, is_bytes)
    }

    fn python_quoted(&mut self, raw: bool, is_bytes: bool) -> PResult<Piece> {
        let Some(q) = self.peek() else {
            return self.err("unterminated string");
        };
        let triple = self.bytes.get(self.pos..self.pos + 3) == Some(&[q, q, q][..]);
        self.pos += if triple { 3 } else { 1 };
        let mut out: Vec<u8> = Vec::new();
        let mut text = String::new();
        let push_char = |c: char, text: &mut String, out: &mut Vec<u8>| {
            if is_bytes {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            } else {
                text.push(c);
            }
        };
        loop {
            let rest = self.text.get(self.pos..).unwrap_or("");
            let Some(c) = rest.chars().next() else {
                return self.err("unterminated string");
            };
            if c as u32 == q as u32 {
                if !triple {
                    self.pos += 1;
                    break;
                }
                if self.bytes.get(self.pos..self.pos + 3) == Some(&[q, q, q][..]) {
                    self.pos += 3;
                    break;
                }
            }
            if (c == '\n' || c == '\r') && !triple {
                return self.err("line break inside a string");
            }
            if c != '\\' {
                if is_bytes && !c.is_ascii() {
                    return self.err("non-ASCII character in a bytes literal");
                }
                push_char(c, &mut text, &mut out);
                self.pos += c.len_utf8();
                continue;
            }
            // A backslash.
            self.pos += 1;
            let Some(e) = self.text.get(self.pos..).and_then(|s| s.chars().next()) else {
                return self.err("unterminated string");
            };
            if raw {
                // Raw strings keep the backslash; it still protects a following quote.
                push_char('\\', &mut text, &mut out);
                push_char(e, &mut text, &mut out);
                self.pos += e.len_utf8();
                continue;
            }
            self.pos += e.len_utf8();
            let simple = match e {
                '\n' => Some(None),
                '\\' => Some(Some('\\')),
                '\'' => Some(Some('\'')),
                '"' => Some(Some('"')),
                'a' => Some(Some('\u{7}')),
                'b' => Some(Some('\u{8}')),
                'f' => Some(Some('\u{c}')),
                'n' => Some(Some('\n')),
                'r' => Some(Some('\r')),
                't' => Some(Some('\t')),
                'v' => Some(Some('\u{b}')),
                _ => None,
            };
            if let Some(c) = simple {
                if let Some(c) = c {
                    push_char(c, &mut text, &mut out);
                }
                continue;
            }
            match e {
                '0'..='7' => {
                    let mut v = e as u32 - '0' as u32;
                    for _ in 0..2 {
                        match self.peek() {
                            Some(d @ b'0'..=b'7') => {
                                v = v * 8 + u32::from(d - b'0');
                                self.pos += 1;
                            }
                            _ => break,
                        }
                    }
                    if is_bytes {
                        out.push((v & 0xFF) as u8);
                    } else {
                        match char::from_u32(v) {
                            Some(c) => text.push(c),
                            None => return self.err("invalid octal escape"),
                        }
                    }
                }
                'x' => {
                    let v = self.hex_digits(2)?;
                    if is_bytes {
                        out.push(v as u8);
                    } else {
                        match char::from_u32(v) {
                            Some(c) => text.push(c),
                            None => return self.err("invalid \\x escape"),
                        }
                    }
                }
                'u' | 'U' if !is_bytes => {
                    let v = self.hex_digits(if e == 'u' { 4 } else { 8 })?;
                    match char::from_u32(v) {
                        Some(c) => text.push(c),
                        None => {
                            return self.err(format!(
                                "\\{e}{v:x} is not a Unicode scalar value (a lone surrogate?)"
                            ))
                        }
                    }
                }
                'N' if !is_bytes => {
                    return self.err("\\N{...} named escapes are not supported");
                }
                other => {
                    // Python keeps unknown escapes as they are.
                    push_char('\\', &mut text, &mut out);
                    push_char(other, &mut text, &mut out);
                }
            }
        }
        Ok(if is_bytes {
            Piece::Bytes(out)
        } else {
            Piece::Text(text)
        })
    }

    fn number(&mut self) -> PResult<Value> {
        self.skip_ws();
        let start = self.pos;
        let mut neg = false;
        match self.peek() {
            Some(b'-') => {
                neg = true;
                self.pos += 1;
            }
            Some(b'+') if self.dialect == Dialect::Python => self.pos += 1,
            _ => {}
        }
        // `-inf`, `-Infinity`, `-nan`.
        if self.peek().is_some_and(|b| b.is_ascii_alphabetic()) {
            if self.dialect == Dialect::Json {
                return self.err("expected a digit");
            }
            return match self.word()? {
                Value::Lit(Literal::String(s)) if s == "Infinity" || s == "NaN" => {
                    Ok(Value::Lit(Literal::String(if neg && s == "Infinity" {
                        "-Infinity".to_string()
                    } else {
                        s
                    })))
                }
                _ => {
                    self.pos = start;
                    self.err("expected a number")
                }
            };
        }
        let body_start = self.pos;
        while let Some(b) = self.peek() {
            // An exponent sign directly after the `e` of a decimal (not hex) literal.
            let exponent_sign = matches!(b, b'+' | b'-')
                && self.pos > body_start
                && matches!(self.bytes.get(self.pos - 1), Some(b'e') | Some(b'E'))
                && !self.text[body_start..self.pos]
                    .to_ascii_lowercase()
                    .starts_with("0x");
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_') || exponent_sign {
                self.pos += 1;
            } else {
                break;
            }
        }
        let body = &self.text[body_start..self.pos];
        let normal = match self.dialect {
            Dialect::Json => json_number(body),
            Dialect::Python => python_number(body),
        };
        match normal {
            Some(n) => Ok(Value::Lit(Literal::Number(if neg {
                format!("-{n}")
            } else {
                n
            }))),
            None => {
                let text = self.text[start..self.pos].to_string();
                self.pos = start;
                self.err(format!("{text:?} is not a number"))
            }
        }
    }

    /// A bare word: a keyword, a Python name or dotted call (`Decimal('1')`), or a string
    /// prefix (`b'..'`).
    fn word(&mut self) -> PResult<Value> {
        self.skip_ws();
        let start = self.pos;
        if self.dialect == Dialect::Python {
            let (_, _) = self.string_prefix();
            if self.pos != start || matches!(self.peek(), Some(b'\'') | Some(b'"')) {
                self.pos = start;
                return Ok(Value::Lit(self.python_string_value()?));
            }
        }
        while let Some(b) = self.peek() {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' {
                self.pos += 1;
            } else {
                break;
            }
        }
        let name = &self.text[start..self.pos];
        let py = self.dialect == Dialect::Python;
        let lit = match name {
            "true" => Some(Literal::Bool(true)),
            "false" => Some(Literal::Bool(false)),
            "null" => Some(Literal::Null),
            "True" if py => Some(Literal::Bool(true)),
            "False" if py => Some(Literal::Bool(false)),
            "None" if py => Some(Literal::Null),
            "inf" | "Infinity" if py => Some(Literal::String("Infinity".into())),
            "nan" | "NaN" if py => Some(Literal::String("NaN".into())),
            _ => None,
        };
        if let Some(l) = lit {
            return Ok(Value::Lit(l));
        }
        if !py {
            self.pos = start;
            return self.err(format!("unexpected word {name:?}"));
        }
        if self.eat(b'(') {
            return self.call(name, start);
        }
        let last = name.rsplit('.').next().unwrap_or(name);
        if last == "utc" || name == "UTC" {
            return Ok(Value::Tz(TzValue::Offset(0)));
        }
        self.pos = start;
        self.err(format!("unsupported Python name {name:?}"))
    }

    /// `name(` consumed: arguments, then the value the constructor stands for.
    fn call(&mut self, name: &str, start: usize) -> PResult<Value> {
        self.enter()?;
        let mut args: Vec<Value> = Vec::new();
        let mut kwargs: Vec<(String, Value)> = Vec::new();
        if !self.eat(b')') {
            loop {
                self.skip_ws();
                let save = self.pos;
                // `name=value`?
                let mut kw = None;
                while let Some(b) = self.peek() {
                    if b.is_ascii_alphanumeric() || b == b'_' {
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                if self.pos > save {
                    let ident = self.text[save..self.pos].to_string();
                    self.skip_ws();
                    if self.peek() == Some(b'=') {
                        self.pos += 1;
                        kw = Some(ident);
                    } else {
                        self.pos = save;
                    }
                } else {
                    self.pos = save;
                }
                let v = self.any_value()?;
                match kw {
                    Some(k) => kwargs.push((k, v)),
                    None => args.push(v),
                }
                if self.eat(b',') {
                    if self.eat(b')') {
                        break;
                    }
                    continue;
                }
                self.expect(b')')?;
                break;
            }
        }
        self.depth -= 1;
        construct(name, args, kwargs).map_err(|message| ParseError {
            offset: start,
            message,
        })
    }
}

enum Piece {
    Text(String),
    Bytes(Vec<u8>),
}

/// A JSON number body (sign handled by the caller) if valid, unchanged.
fn json_number(body: &str) -> Option<String> {
    let b = body.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let s = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > s
    };
    if b.first() == Some(&b'0') {
        i = 1;
    } else if !digits(&mut i) {
        return None;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return None;
        }
    }
    if matches!(b.get(i), Some(b'e') | Some(b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+') | Some(b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return None;
        }
    }
    (i == b.len()).then(|| body.to_string())
}

/// A Python int or float literal as JSON number text.
fn python_number(body: &str) -> Option<String> {
    if body.ends_with('_') || body.contains("__") || body.starts_with('_') {
        return None;
    }
    let clean: String = body.chars().filter(|&c| c != '_').collect();
    let lower = clean.to_ascii_lowercase();
    for (prefix, radix) in [("0x", 16), ("0o", 8), ("0b", 2)] {
        if let Some(digits) = lower.strip_prefix(prefix) {
            return u128::from_str_radix(digits, radix)
                .ok()
                .map(|v| v.to_string());
        }
    }
    if lower.ends_with('j') || lower.ends_with('l') {
        return None;
    }
    // Split mantissa / exponent.
    let (mantissa, exponent) = match lower.find('e') {
        Some(i) => (&lower[..i], Some(&lower[i + 1..])),
        None => (lower.as_str(), None),
    };
    let (int_part, frac) = match mantissa.find('.') {
        Some(i) => (&mantissa[..i], Some(&mantissa[i + 1..])),
        None => (mantissa, None),
    };
    if !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac.unwrap_or("").bytes().all(|b| b.is_ascii_digit())
        || (int_part.is_empty() && frac.unwrap_or("").is_empty())
    {
        return None;
    }
    let int_norm = int_part.trim_start_matches('0');
    let mut out = if int_norm.is_empty() {
        "0".to_string()
    } else {
        int_norm.to_string()
    };
    if let Some(f) = frac {
        out.push('.');
        out.push_str(if f.is_empty() { "0" } else { f });
    }
    if let Some(e) = exponent {
        let (sign, digits) = match e.as_bytes().first() {
            Some(b'+') | Some(b'-') => (&e[..1], &e[1..]),
            _ => ("", e),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        out.push('e');
        if sign == "-" {
            out.push('-');
        }
        out.push_str(digits);
    }
    Some(out)
}

/// The value a supported Python constructor call stands for.
fn construct(name: &str, args: Vec<Value>, kwargs: Vec<(String, Value)>) -> Result<Value, String> {
    let last = name.rsplit('.').next().unwrap_or(name);
    let mut a = Args::new(name, args, kwargs);
    let v = match last {
        "Decimal" => {
            let text = a.string(0, "value")?;
            a.done()?;
            let t = text.trim();
            match t.to_ascii_lowercase().as_str() {
                "nan" | "snan" => Value::Lit(Literal::String("NaN".into())),
                "infinity" | "inf" | "+infinity" | "+inf" => {
                    Value::Lit(Literal::String("Infinity".into()))
                }
                "-infinity" | "-inf" => Value::Lit(Literal::String("-Infinity".into())),
                _ => {
                    let (neg, body) = match t.strip_prefix('-') {
                        Some(b) => (true, b),
                        None => (false, t.strip_prefix('+').unwrap_or(t)),
                    };
                    let n = python_number(body)
                        .filter(|_| !body.contains('_') && !body.starts_with("0x"))
                        .ok_or_else(|| format!("Decimal({text:?}) is not a decimal number"))?;
                    Value::Lit(Literal::Number(if neg { format!("-{n}") } else { n }))
                }
            }
        }
        "UUID" => {
            let text = a.string(0, "hex")?;
            a.done()?;
            Value::Lit(Literal::String(text))
        }
        "date" => {
            let (y, m, d) = (a.int(0, "year")?, a.int(1, "month")?, a.int(2, "day")?);
            a.done()?;
            Value::Lit(Literal::String(format!("{y:04}-{m:02}-{d:02}")))
        }
        "time" => {
            let h = a.int_or(0, "hour", 0)?;
            let mi = a.int_or(1, "minute", 0)?;
            let s = a.int_or(2, "second", 0)?;
            let us = a.int_or(3, "microsecond", 0)?;
            let tz = a.tz(4, "tzinfo")?;
            a.skip("fold");
            a.done()?;
            Value::Lit(Literal::String(format!(
                "{}{}",
                clock(h, mi, s, us),
                tz_suffix(tz.as_ref())
            )))
        }
        "datetime" => {
            let (y, m, d) = (a.int(0, "year")?, a.int(1, "month")?, a.int(2, "day")?);
            let h = a.int_or(3, "hour", 0)?;
            let mi = a.int_or(4, "minute", 0)?;
            let s = a.int_or(5, "second", 0)?;
            let us = a.int_or(6, "microsecond", 0)?;
            let tz = a.tz(7, "tzinfo")?;
            a.skip("fold");
            a.done()?;
            Value::Lit(Literal::String(format!(
                "{y:04}-{m:02}-{d:02}T{}{}",
                clock(h, mi, s, us),
                tz_suffix(tz.as_ref())
            )))
        }
        "timedelta" => {
            let days = a.int_or(0, "days", 0)?;
            let secs = a.int_or(1, "seconds", 0)?;
            let us = a.int_or(2, "microseconds", 0)?;
            let ms = a.int_or(3, "milliseconds", 0)?;
            let mins = a.int_or(4, "minutes", 0)?;
            let hours = a.int_or(5, "hours", 0)?;
            let weeks = a.int_or(6, "weeks", 0)?;
            a.done()?;
            let total = i128::from(us)
                + i128::from(ms) * 1_000
                + (i128::from(secs)
                    + i128::from(mins) * 60
                    + i128::from(hours) * 3_600
                    + (i128::from(days) + i128::from(weeks) * 7) * 86_400)
                    * 1_000_000;
            Value::Delta(total)
        }
        "timezone" => {
            let offset = match a.take(0, "offset") {
                Some(Value::Delta(us)) => us,
                Some(_) => return Err(format!("{name}(): offset must be a timedelta")),
                None => return Err(format!("{name}() needs an offset")),
            };
            a.skip("name");
            a.done()?;
            let secs = i64::try_from(offset / 1_000_000)
                .map_err(|_| format!("{name}(): offset out of range"))?;
            Value::Tz(TzValue::Offset(secs))
        }
        "FixedOffsetTimezone" => {
            let minutes = a.int_or(0, "offset", 0)?;
            a.skip("name");
            a.done()?;
            let secs = minutes
                .checked_mul(60)
                .ok_or_else(|| format!("{name}(): offset out of range"))?;
            Value::Tz(TzValue::Offset(secs))
        }
        "ZoneInfo" | "timezone_from_name" => {
            let key = a.string(0, "key")?;
            a.done()?;
            Value::Tz(TzValue::Zone(key))
        }
        _ => {
            return Err(format!(
                "unsupported Python call {name}(...); only Decimal, UUID, datetime.date, \
                 datetime.time, datetime.datetime, datetime.timedelta and time zones are read"
            ))
        }
    };
    Ok(v)
}

fn clock(h: i64, m: i64, s: i64, us: i64) -> String {
    if us == 0 {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}.{us:06}")
    }
}

fn tz_suffix(tz: Option<&TzValue>) -> String {
    match tz {
        None => String::new(),
        Some(TzValue::Zone(z)) => format!(" {z}"),
        Some(TzValue::Offset(secs)) => {
            let sign = if *secs < 0 { '-' } else { '+' };
            let a = secs.unsigned_abs();
            let (h, m, s) = (a / 3600, (a % 3600) / 60, a % 60);
            if s == 0 {
                format!("{sign}{h:02}:{m:02}")
            } else {
                format!("{sign}{h:02}:{m:02}:{s:02}")
            }
        }
    }
}

/// A timedelta as PostgreSQL interval input.
fn interval_text(us: i128) -> String {
    let sign = if us < 0 { "-" } else { "" };
    let a = us.unsigned_abs();
    let (secs, micro) = (a / 1_000_000, a % 1_000_000);
    if micro == 0 {
        format!("{sign}{secs} seconds")
    } else {
        format!("{sign}{secs}.{micro:06} seconds")
    }
}

/// Positional and keyword arguments of one call.
struct Args<'n> {
    name: &'n str,
    pos: Vec<Option<Value>>,
    kw: Vec<(String, Option<Value>)>,
}

impl<'n> Args<'n> {
    fn new(name: &'n str, args: Vec<Value>, kwargs: Vec<(String, Value)>) -> Self {
        Args {
            name,
            pos: args.into_iter().map(Some).collect(),
            kw: kwargs.into_iter().map(|(k, v)| (k, Some(v))).collect(),
        }
    }

    fn take(&mut self, i: usize, key: &str) -> Option<Value> {
        if let Some(v) = self.pos.get_mut(i).and_then(Option::take) {
            return Some(v);
        }
        self.kw
            .iter_mut()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.take())
    }

    fn skip(&mut self, key: &str) {
        for (k, v) in &mut self.kw {
            if k == key {
                *v = None;
            }
        }
    }

    fn int(&mut self, i: usize, key: &str) -> Result<i64, String> {
        match self.take(i, key) {
            Some(Value::Lit(Literal::Number(n))) => n
                .parse::<i64>()
                .map_err(|_| format!("{}(): {key} must be an integer, found {n}", self.name)),
            Some(_) => Err(format!("{}(): {key} must be an integer", self.name)),
            None => Err(format!("{}(): {key} is missing", self.name)),
        }
    }

    fn int_or(&mut self, i: usize, key: &str, default: i64) -> Result<i64, String> {
        match self.take(i, key) {
            None => Ok(default),
            Some(Value::Lit(Literal::Number(n))) => n
                .parse::<i64>()
                .map_err(|_| format!("{}(): {key} must be an integer, found {n}", self.name)),
            Some(_) => Err(format!("{}(): {key} must be an integer", self.name)),
        }
    }

    fn string(&mut self, i: usize, key: &str) -> Result<String, String> {
        match self.take(i, key) {
            Some(Value::Lit(Literal::String(s))) => Ok(s),
            Some(Value::Lit(Literal::Number(n))) => Ok(n),
            Some(_) => Err(format!("{}(): {key} must be a string", self.name)),
            None => Err(format!("{}(): {key} is missing", self.name)),
        }
    }

    fn tz(&mut self, i: usize, key: &str) -> Result<Option<TzValue>, String> {
        match self.take(i, key) {
            None | Some(Value::Lit(Literal::Null)) => Ok(None),
            Some(Value::Tz(tz)) => Ok(Some(tz)),
            Some(_) => Err(format!("{}(): unsupported {key}", self.name)),
        }
    }

    fn done(&self) -> Result<(), String> {
        if self.pos.iter().any(Option::is_some) {
            return Err(format!("{}(): too many arguments", self.name));
        }
        if let Some((k, _)) = self.kw.iter().find(|(_, v)| v.is_some()) {
            return Err(format!("{}(): unexpected argument {k}", self.name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> String {
        parse(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .to_json()
    }

    #[test]
    fn extreme_numbers_in_calls_are_errors_not_overflows() {
        // Row contents are untrusted: arithmetic on them must not wrap or panic.
        let e = parse(&format!(
            "{{'at': datetime.datetime(2024, 1, 2, tzinfo=psycopg2.tz.FixedOffsetTimezone(offset={}))}}",
            i64::MAX
        ))
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        let e = parse(&format!(
            "{{'at': datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone(datetime.timedelta(days={})))}}",
            i64::MAX
        ))
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        // The largest timedelta still has an exact interval text.
        let max = i64::MAX;
        assert!(json(&format!(
            "{{'iv': datetime.timedelta(days={max}, seconds={max}, microseconds={max}, \
             milliseconds={max}, minutes={max}, hours={max}, weeks={max})}}"
        ))
        .contains(" seconds"));
    }

    #[test]
    fn json_is_read_verbatim() {
        assert_eq!(
            json(r#"{"id": 1, "ok": true, "x": null, "n": 12345678901234567890.123456789}"#),
            r#"{"id":1,"ok":true,"x":null,"n":12345678901234567890.123456789}"#
        );
        assert_eq!(
            json(r#"{"s": "a\"b\\c\/d\u00e9\ud83d\ude00\n"}"#),
            "{\"s\":\"a\\\"b\\\\c/dé😀\\n\"}"
        );
        assert_eq!(
            json(r#"{"a": [1, -2.5e-3, {"b": []}]}"#),
            r#"{"a":[1,-2.5e-3,{"b":[]}]}"#
        );
    }

    #[test]
    fn python_dicts_with_single_quotes_and_keywords() {
        assert_eq!(
            json("{'id': 1, 'ok': True, 'no': False, 'x': None}"),
            r#"{"id":1,"ok":true,"no":false,"x":null}"#
        );
        assert_eq!(
            json(r#"{'name': "O'Brien", 'q': 'say "hi"', 'esc': 'it\'s'}"#),
            r#"{"name":"O'Brien","q":"say \"hi\"","esc":"it's"}"#
        );
        assert_eq!(
            json("{'nested': {'l': [1, (2, 3), (4,)], 's': {5}}, 'e': [], 't': (),}"),
            r#"{"nested":{"l":[1,[2,3],[4]],"s":[5]},"e":[],"t":[]}"#
        );
    }

    #[test]
    fn python_escapes() {
        assert_eq!(
            json(r"{'a': '\x41\u00e9\U0001F600\101\t\\ \q'}"),
            "{\"a\":\"Aé😀A\\t\\\\ \\\\q\"}"
        );
        assert_eq!(json(r"{'r': r'\d+'}"), r#"{"r":"\\d+"}"#);
        assert_eq!(json("{'c': 'ab' 'cd' \"ef\"}"), r#"{"c":"abcdef"}"#);
        assert_eq!(json(r"{'b': b'\x00\xffA'}"), r#"{"b":"\\x00ff41"}"#);
        assert_eq!(json("{'u': u'x'}"), r#"{"u":"x"}"#);
        assert_eq!(json("{'t': '''multi\nline'''}"), r#"{"t":"multi\nline"}"#);
        assert_eq!(json("{'nl': 'a\\\nb'}"), r#"{"nl":"ab"}"#);
    }

    #[test]
    fn python_numbers() {
        assert_eq!(
            json("{'a': 1_000, 'b': 0x1F, 'c': 1., 'd': .5, 'e': -3, 'f': +2, 'g': 1E5, 'h': 00}"),
            r#"{"a":1000,"b":31,"c":1.0,"d":0.5,"e":-3,"f":2,"g":1e5,"h":0}"#
        );
        assert_eq!(
            json("{'i': inf, 'j': -inf, 'k': nan}"),
            r#"{"i":"Infinity","j":"-Infinity","k":"NaN"}"#
        );
        assert!(parse("{'a': 1j}").is_err());
        assert!(parse("{'a': 1__0}").is_err());
    }

    #[test]
    fn python_reprs_of_database_values() {
        assert_eq!(
            json("{'price': Decimal('10.50'), 'neg': decimal.Decimal('-0.001')}"),
            r#"{"price":10.50,"neg":-0.001}"#
        );
        assert_eq!(
            json("{'d': datetime.date(2024, 1, 2), 't': datetime.time(3, 4, 5, 6)}"),
            r#"{"d":"2024-01-02","t":"03:04:05.000006"}"#
        );
        assert_eq!(
            json("{'at': datetime.datetime(2024, 1, 2, 3, 4, 5, 600000, tzinfo=datetime.timezone.utc)}"),
            r#"{"at":"2024-01-02T03:04:05.600000+00:00"}"#
        );
        assert_eq!(
            json("{'at': datetime.datetime(2024, 1, 2, 3, 4, tzinfo=datetime.timezone(datetime.timedelta(days=-1, seconds=68400)))}"),
            r#"{"at":"2024-01-02T03:04:00-05:00"}"#
        );
        assert_eq!(
            json("{'at': datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=psycopg2.tz.FixedOffsetTimezone(offset=60, name=None))}"),
            r#"{"at":"2024-01-02T03:04:05+01:00"}"#
        );
        assert_eq!(
            json("{'at': datetime.datetime(2024, 1, 2, tzinfo=zoneinfo.ZoneInfo(key='Europe/Madrid'))}"),
            r#"{"at":"2024-01-02T00:00:00 Europe/Madrid"}"#
        );
        assert_eq!(
            json("{'u': UUID('12345678-1234-5678-1234-567812345678'), 'iv': datetime.timedelta(days=1, seconds=5, microseconds=7)}"),
            r#"{"u":"12345678-1234-5678-1234-567812345678","iv":"86405.000007 seconds"}"#
        );
        assert_eq!(
            json("{'iv': datetime.timedelta(-1)}"),
            r#"{"iv":"-86400 seconds"}"#
        );
    }

    #[test]
    fn unsupported_python_is_an_error_not_a_guess() {
        let e = parse("{'a': os.system('rm -rf /')}").unwrap_err();
        assert!(
            e.message.contains("unsupported Python call os.system"),
            "{e}"
        );
        let e = parse("{'a': <UTC>}").unwrap_err();
        assert!(e.message.contains("expected a value"), "{e}");
        assert!(parse("{'a': __import__('os')}").is_err());
        assert!(parse("{'a': lambda: 1}").is_err());
    }

    #[test]
    fn malformed_text_reports_the_furthest_error() {
        let e = parse(r#"{"id": 1, "name": }"#).unwrap_err();
        assert_eq!(e.offset, 18, "{e}");
        let e = parse("{'id': 1, 'name': 'unterminated}").unwrap_err();
        assert!(e.message.contains("unterminated"), "{e}");
        assert!(parse("").is_err());
        assert!(parse("{} trailing").is_err());
        assert!(parse("{'a': 1").is_err());
        assert!(
            parse(r#"{"a": "\x41"}"#).is_ok(),
            "a Python escape in double quotes"
        );
    }

    #[test]
    fn rows_must_be_objects() {
        let e = parse_row("[1, 2]").unwrap_err();
        assert!(e.message.contains("must be an object"), "{e}");
        assert_eq!(
            parse_row("{'a': 1, 2: 'x'}").unwrap(),
            vec![
                ("a".to_string(), Literal::Number("1".into())),
                ("2".to_string(), Literal::String("x".into()))
            ]
        );
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let e = parse(&format!("{{\"a\": {deep}}}")).unwrap_err();
        assert!(e.message.contains("nested"), "{e}");
    }

    #[test]
    fn random_texts_never_panic_and_accepted_ones_are_json() {
        // A small deterministic generator over the characters that matter to the grammar.
        let alphabet: Vec<char> = "{}[]():,'\"\\ 0123456789.eE+-_xobjuUNrRbBTFNnatifl \n\té😀"
            .chars()
            .collect();
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 24) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            for candidate in [
                text.clone(),
                format!("{{'a': {text}}}"),
                format!("{{\"a\": {text}}}"),
            ] {
                if let Ok(v) = parse(&candidate) {
                    let json = v.to_json();
                    assert!(
                        serde_json::from_str::<serde_json::Value>(&json).is_ok(),
                        "{candidate:?} gave invalid JSON {json}"
                    );
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let samples = [
            "{'",
            "{\"",
            "{'a':",
            "{'a': b'\\",
            "{'a': '\\x4",
            "{'a': '\\U0011ffff'}",
            "{'a': Decimal(",
            "{'a': Decimal('x')}",
            "{'a': datetime.date(1)}",
            "\u{0}",
            "{'a': -}",
            "{'a': 0x}",
            "{'a': 1e}",
            "{'a': '\\ud800'}",
            "{\"a\": \"\\ud800\"}",
            "{'é': 'ü'}",
            "({[",
            "{'a': (1, 2",
            "{1: 2}",
            "{'a': 1, }",
        ];
        for s in samples {
            let _ = parse(s);
        }
        // Every prefix of a rich sample.
        let rich =
            "{'a': [1, (2,), {3}], 'b': b'\\x00', 'c': Decimal('1.5'), 'd': \"x\\ty\", 'é': None}";
        for (i, _) in rich.char_indices() {
            let _ = parse(&rich[..i]);
        }
        assert!(parse(rich).is_ok());
    }
}

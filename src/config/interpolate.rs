//! `${NAME}` environment-variable interpolation inside `dsn` values.
//!
//! `${NAME}` is replaced by the variable's value, `$$` by a single `$`, and any other `$` is
//! kept as it is (so `pa$word` needs no escaping). Values are never echoed in errors: they
//! usually hold passwords.

use std::env::VarError;

/// Why a `dsn` value could not be interpolated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    /// `${NAME}` names a variable that is not set.
    #[error("environment variable {0} is not set; export it or write the value into the dsn")]
    Missing(String),
    /// The variable is set but not valid UTF-8.
    #[error("environment variable {0} is not valid UTF-8")]
    NotUnicode(String),
    /// `${` without a closing `}`.
    #[error("\"${{\" at byte {0} has no closing \"}}\"; write ${{NAME}}, or $$ for a literal $")]
    Unterminated(usize),
    /// `${...}` whose content is not a variable name.
    #[error("${{{0}}} is not a variable reference: names are letters, digits and _, not starting with a digit")]
    BadName(String),
}

/// Replaces every `${NAME}` in `text` using `lookup` (normally [`std::env::var`]).
pub fn interpolate(
    text: &str,
    lookup: &dyn Fn(&str) -> Result<String, VarError>,
) -> Result<String, InterpolateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let offset = text.len() - rest.len() + at;
            let end = tail
                .find('}')
                .ok_or(InterpolateError::Unterminated(offset))?;
            let name = &tail[..end];
            if !is_var_name(name) {
                return Err(InterpolateError::BadName(name.to_string()));
            }
            match lookup(name) {
                Ok(value) => out.push_str(&value),
                Err(VarError::NotPresent) => {
                    return Err(InterpolateError::Missing(name.to_string()))
                }
                Err(VarError::NotUnicode(_)) => {
                    return Err(InterpolateError::NotUnicode(name.to_string()))
                }
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether `text` is exactly one `${NAME}` and nothing else.
pub fn is_single_reference(text: &str) -> bool {
    text.strip_prefix("${")
        .and_then(|t| t.strip_suffix('}'))
        .is_some_and(is_var_name)
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Result<String, VarError> {
        match name {
            "PW" => Ok("s3cr$t".into()),
            "HOST" => Ok("db1".into()),
            _ => Err(VarError::NotPresent),
        }
    }

    #[test]
    fn replaces_variables() {
        assert_eq!(
            interpolate("host=${HOST} password=${PW}", &env).unwrap(),
            "host=db1 password=s3cr$t"
        );
        assert_eq!(interpolate("no vars", &env).unwrap(), "no vars");
    }

    #[test]
    fn single_references() {
        assert!(is_single_reference("${DATABASE_URL}"));
        assert!(!is_single_reference("host=${H}"));
        assert!(!is_single_reference("${A}${B}"));
        assert!(!is_single_reference("${}"));
    }

    #[test]
    fn dollar_escapes_and_literals() {
        assert_eq!(interpolate("a$$b", &env).unwrap(), "a$b");
        assert_eq!(interpolate("$${PW}", &env).unwrap(), "${PW}");
        assert_eq!(interpolate("pa$word$", &env).unwrap(), "pa$word$");
    }

    #[test]
    fn errors_name_the_variable() {
        assert_eq!(
            interpolate("x=${NOPE}", &env),
            Err(InterpolateError::Missing("NOPE".into()))
        );
        assert_eq!(
            interpolate("x=${PW", &env),
            Err(InterpolateError::Unterminated(2))
        );
        assert_eq!(
            interpolate("x=${1A}", &env),
            Err(InterpolateError::BadName("1A".into()))
        );
        assert!(InterpolateError::Missing("NOPE".into())
            .to_string()
            .contains("NOPE"));
    }
}

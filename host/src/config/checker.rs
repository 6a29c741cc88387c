//! Where a bad value is: the file, line and column of the key at fault.

use toml::Spanned;

use super::ConfigError;

/// The longest duration a config value may give: a day.
pub(super) const MAX_MS: u64 = 86_400_000;

pub(crate) struct Checker<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

impl Checker<'_> {
    pub fn at<T>(&self, spanned: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        let offset = spanned.span().start.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
        ConfigError::Invalid {
            file: self.file.to_string(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// A positive number of milliseconds, at most a day.
    pub fn millis(&self, v: &Option<Spanned<u64>>, key: &str) -> Result<Option<u64>, ConfigError> {
        match v {
            Some(ms) if *ms.get_ref() > MAX_MS => Err(self.at(ms, key, "at most a day (86400000)")),
            _ => self.positive(v, key),
        }
    }

    pub fn positive<T: Copy + PartialOrd + Default>(
        &self,
        v: &Option<Spanned<T>>,
        key: &str,
    ) -> Result<Option<T>, ConfigError> {
        match v {
            Some(s) if *s.get_ref() <= T::default() => Err(self.at(s, key, "must be greater than 0")),
            Some(s) => Ok(Some(*s.get_ref())),
            None => Ok(None),
        }
    }

    /// A value within `min..=max` (both said in the error).
    pub fn range<T: Copy + PartialOrd + std::fmt::Display>(
        &self,
        v: &Option<Spanned<T>>,
        key: &str,
        min: T,
        max: T,
    ) -> Result<Option<T>, ConfigError> {
        match v {
            Some(s) if *s.get_ref() < min || *s.get_ref() > max => {
                Err(self.at(s, key, format!("must be {min} to {max}")))
            }
            Some(s) => Ok(Some(*s.get_ref())),
            None => Ok(None),
        }
    }

    /// A percentage, 0 to 100.
    pub fn percent(&self, v: &Option<Spanned<u8>>, key: &str, default: u8) -> Result<u8, ConfigError> {
        match v {
            Some(p) if *p.get_ref() > 100 => Err(self.at(p, key, "a percentage, 0 to 100")),
            Some(p) => Ok(*p.get_ref()),
            None => Ok(default),
        }
    }
}

/// Plugin and tenant names: 1-64 letters, digits, `_`, `-` or `.`.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

//! Validated identifiers and values that cross the wire: user and group ids, file names,
//! passwords and SHA1 digests. A value of one of these types has passed its rules, so code
//! that holds one need not check again.

use std::fmt;

/// Longest user or group id, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Longest file name, in bytes (the usual file-system limit).
pub const MAX_FILE_NAME_LEN: usize = 255;
/// Longest password, in bytes.
pub const MAX_PASSWORD_LEN: usize = 256;

/// Why a string was refused as an identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdError {
    Empty,
    TooLong { max: usize },
    WhiteSpaceOrControl,
    NotABaseName,
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::Empty => write!(f, "must not be empty"),
            IdError::TooLong { max } => write!(f, "longer than {max} bytes"),
            IdError::WhiteSpaceOrControl => {
                write!(f, "must not contain white space or control characters")
            }
            IdError::NotABaseName => write!(f, "must be a base name (no '/', not '.' or '..')"),
        }
    }
}

impl std::error::Error for IdError {}

fn check_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { max: MAX_ID_LEN });
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(IdError::WhiteSpaceOrControl);
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn new(s: &str) -> Result<Self, IdError> {
                let check: fn(&str) -> Result<(), IdError> = $check;
                check(s)?;
                Ok($name(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    };
}

string_id!(
    /// A user id: 1 to 64 bytes, no white space or control characters.
    UserId,
    check_id
);
string_id!(
    /// A group id: 1 to 64 bytes, no white space or control characters.
    GroupId,
    check_id
);
string_id!(
    /// A shared file's name: a base name of 1 to 255 bytes (no `/`, no NUL or other control
    /// characters, not `.` or `..`). Spaces are allowed.
    FileName,
    |s| {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_FILE_NAME_LEN {
            return Err(IdError::TooLong {
                max: MAX_FILE_NAME_LEN,
            });
        }
        if s.contains('/') || s == "." || s == ".." {
            return Err(IdError::NotABaseName);
        }
        if s.chars().any(char::is_control) {
            return Err(IdError::WhiteSpaceOrControl);
        }
        Ok(())
    }
);

/// A password in clear, as typed. It only travels from the client to the tracker, which turns
/// it into a salted slow hash at once; `Debug` never shows it, so it cannot end up in a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Vec<u8>);

impl Password {
    pub fn new(bytes: &[u8]) -> Result<Self, IdError> {
        if bytes.is_empty() {
            return Err(IdError::Empty);
        }
        if bytes.len() > MAX_PASSWORD_LEN {
            return Err(IdError::TooLong {
                max: MAX_PASSWORD_LEN,
            });
        }
        Ok(Password(bytes.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// A SHA1 digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Sha1Digest(pub [u8; 20]);

impl fmt::Display for Sha1Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sha1Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha1({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_rules() {
        assert!(UserId::new("alice").is_ok());
        assert!(UserId::new(&"x".repeat(64)).is_ok());
        assert_eq!(UserId::new(""), Err(IdError::Empty));
        assert_eq!(
            UserId::new(&"x".repeat(65)),
            Err(IdError::TooLong { max: 64 })
        );
        assert_eq!(UserId::new("a b"), Err(IdError::WhiteSpaceOrControl));
        assert_eq!(GroupId::new("a\tb"), Err(IdError::WhiteSpaceOrControl));
        assert_eq!(GroupId::new("a\u{7}"), Err(IdError::WhiteSpaceOrControl));
        assert!(GroupId::new("grüppe").is_ok());
    }

    #[test]
    fn file_name_rules() {
        assert!(FileName::new("my file.txt").is_ok());
        assert_eq!(FileName::new("a/b"), Err(IdError::NotABaseName));
        assert_eq!(FileName::new("."), Err(IdError::NotABaseName));
        assert_eq!(FileName::new(".."), Err(IdError::NotABaseName));
        assert!(FileName::new("...").is_ok());
        assert_eq!(FileName::new("a\nb"), Err(IdError::WhiteSpaceOrControl));
        assert_eq!(FileName::new(""), Err(IdError::Empty));
    }

    #[test]
    fn password_is_never_shown() {
        let p = Password::new(b"hunter2").unwrap();
        assert!(!format!("{p:?}").contains("hunter2"));
    }

    #[test]
    fn digest_hex() {
        let mut d = Sha1Digest::default();
        d.0[0] = 0xab;
        d.0[19] = 0x01;
        assert_eq!(
            d.to_string(),
            "ab000000000000000000000000000000000000".to_owned() + "01"
        );
    }
}

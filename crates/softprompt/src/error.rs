//! The library's errors. Each says what went wrong and where (file, line, field, the option or
//! the adapter that does not fit), and has a kind a caller can act on: the server chooses its HTTP
//! status from it, the Python binding its exception. The binaries wrap these in `anyhow`.

use std::fmt::Display;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug)]
pub enum Error {
    /// The input is wrong and only its owner can fix it: an option, a data row, a template, an
    /// adapter or model that does not fit, a request.
    Invalid(String),
    /// A file could not be read or written (the context names it).
    Io(std::io::Error),
    /// A JSON document did not parse (the context names it).
    Json(serde_json::Error),
    /// A CSV or TSV file did not parse (the context names the file and line).
    Csv(csv::Error),
    /// A safetensors file did not parse or could not be written.
    Safetensors(safetensors::SafeTensorError),
    /// The tensor layer failed: a shape, a dtype, memory.
    Tensor(candle_core::Error),
    /// `source`, with what was being done when it happened.
    Context { context: String, source: Box<Error> },
}

/// `{}` says what went wrong at the outermost level; `{:#}` the whole chain on one line, as
/// anyhow prints it ("cannot read a.tsv: No such file or directory").
impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(message) => f.write_str(message),
            Self::Io(e) => e.fmt(f),
            Self::Json(e) => e.fmt(f),
            Self::Csv(e) => e.fmt(f),
            Self::Safetensors(e) => e.fmt(f),
            Self::Tensor(e) => e.fmt(f),
            Self::Context { context, source } if f.alternate() => {
                write!(f, "{context}: {source:#}")
            }
            Self::Context { context, .. } => f.write_str(context),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Context { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

macro_rules! from_source {
    ($($variant:ident($ty:ty)),+) => {
        $(impl From<$ty> for Error {
            fn from(e: $ty) -> Self {
                Self::$variant(e)
            }
        })+
    };
}
from_source!(
    Io(std::io::Error),
    Json(serde_json::Error),
    Csv(csv::Error),
    Safetensors(safetensors::SafeTensorError),
    Tensor(candle_core::Error)
);

impl Error {
    pub fn invalid(message: impl Display) -> Self {
        Self::Invalid(message.to_string())
    }

    /// The error under all the context around it: what decides its kind.
    pub fn root(&self) -> &Error {
        match self {
            Self::Context { source, .. } => source.root(),
            other => other,
        }
    }

    /// Whether the caller's input is at fault (a bad option, file, adapter or request), rather
    /// than this machine (a failed write, the tensor layer).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self.root(),
            Self::Invalid(_) | Self::Json(_) | Self::Csv(_) | Self::Safetensors(_)
        )
    }

    /// The whole chain on one line, outermost first: "cannot read a.tsv: No such file".
    pub fn chain(&self) -> String {
        format!("{self:#}")
    }
}

/// `anyhow::Context` for the library's own error: wraps an error, or turns a `None`, into an
/// error that says what was being done.
pub trait Context<T> {
    fn context(self, context: impl Display) -> Result<T>;
    fn with_context<C: Display>(self, context: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Display) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context.to_string(),
            source: Box::new(e.into()),
        })
    }

    fn with_context<C: Display>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context().to_string(),
            source: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl Display) -> Result<T> {
        self.ok_or_else(|| Error::invalid(context))
    }

    fn with_context<C: Display>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| Error::invalid(context()))
    }
}

/// Returns an `Error::Invalid` with a formatted message, as `anyhow::bail!` does.
#[macro_export]
macro_rules! bail {
    ($($message:tt)*) => {
        return Err($crate::Error::Invalid(format!($($message)*)))
    };
}

/// An `Error::Invalid` with a formatted message, as `anyhow::anyhow!` makes an error.
#[macro_export]
macro_rules! invalid {
    ($($message:tt)*) => {
        $crate::Error::Invalid(format!($($message)*))
    };
}

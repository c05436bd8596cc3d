//! Lower-case names for the enums that users pick on the command line and that adapters store.

/// Implements `FromStr` and `Display` through the enum's serde names, listing the valid names
/// in the error (`"--pool: unknown value 'x'; expected one of first, pooler, cls, mean"`).
#[macro_export]
macro_rules! named_choice {
    ($ty:ty, $($name:literal),+) => {
        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                ::serde_json::from_value(::serde_json::Value::String(s.to_lowercase())).map_err(|_| {
                    format!("unknown value '{s}'; expected one of {}", [$($name),+].join(", "))
                })
            }
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match ::serde_json::to_value(self) {
                    Ok(::serde_json::Value::String(s)) => f.write_str(&s),
                    _ => Err(std::fmt::Error),
                }
            }
        }
    };
}

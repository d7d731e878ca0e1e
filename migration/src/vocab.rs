//! One table per enum of the shared vocabulary: each variant's spelling (command line, JSON,
//! API) and, for enums that travel in frames, its wire code, written once. [`vocabulary!`]
//! derives from that table the conversions every user needs: `name()`, `ALL`, `Display`,
//! `FromStr`, serde (by name) and `clap::ValueEnum`, and with codes `to_wire()` / `from_wire()`
//! ([`wire_codes!`] alone for enums that only travel in frames).

/// A name that is none of an enum's spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} '{given}' (expected one of: {})", .expected.join(", "))]
pub struct UnknownName {
    /// What the name was meant to be ("backing", "migration mode").
    pub what: &'static str,
    pub given: String,
    /// Every accepted spelling, in order.
    pub expected: Vec<&'static str>,
}

/// Defines a `#[repr]` enum from one table of `Variant = code` lines, with `to_wire()` and
/// `from_wire()` (for the frame fields that carry a code and nothing else).
macro_rules! wire_codes {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $repr:ident {
            $($(#[$vmeta:meta])* $variant:ident = $code:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr($repr)]
        $vis enum $name {
            $($(#[$vmeta])* $variant = $code,)+
        }

        impl $name {
            /// The code this value has on the wire.
            pub fn to_wire(self) -> $repr {
                self as $repr
            }

            /// The value a wire code names, if any.
            pub fn from_wire(code: $repr) -> Option<Self> {
                match code {
                    $($code => Some($name::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

/// Defines an enum from one table of `Variant = "spelling"` (or, with a code type,
/// `Variant = "spelling" => code`) lines; see the module documentation for what it derives.
macro_rules! vocabulary {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $repr:ident, $what:literal {
            $($(#[$vmeta:meta])* $variant:ident = $spelling:literal => $code:literal,)+
        }
    ) => {
        $crate::vocab::wire_codes! {
            $(#[$meta])*
            $vis enum $name: $repr {
                $($(#[$vmeta])* $variant = $code,)+
            }
        }

        $crate::vocab::vocabulary!(@names $name, $what, $($variant = $spelling),+);
    };
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident, $what:literal {
            $($(#[$vmeta:meta])* $variant:ident = $spelling:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        $crate::vocab::vocabulary!(@names $name, $what, $($variant = $spelling),+);
    };
    (@names $name:ident, $what:literal, $($variant:ident = $spelling:literal),+) => {
        impl $name {
            /// Every value, in the order `--help` lists them.
            pub const ALL: [$name; [$($spelling),+].len()] = [$($name::$variant),+];

            /// The spelling of the command line, the API and JSON output.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $spelling,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::vocab::UnknownName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::ALL
                    .into_iter()
                    .find(|v| v.name() == s)
                    .ok_or_else(|| $crate::vocab::UnknownName {
                        what: $what,
                        given: s.to_string(),
                        expected: $name::ALL.iter().map(|v| v.name()).collect(),
                    })
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl clap::ValueEnum for $name {
            fn value_variants<'a>() -> &'a [Self] {
                &$name::ALL
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(clap::builder::PossibleValue::new(self.name()))
            }
        }
    };
}

pub(crate) use {vocabulary, wire_codes};

#[cfg(test)]
mod tests {
    vocabulary! {
        /// A test enum.
        enum Colour: u8, "colour" {
            Red = "red" => 1,
            DeepBlue = "deep-blue" => 7,
        }
    }

    #[test]
    fn one_table_gives_names_codes_and_parsing() {
        assert_eq!(Colour::ALL, [Colour::Red, Colour::DeepBlue]);
        assert_eq!(Colour::DeepBlue.to_wire(), 7);
        assert_eq!(Colour::from_wire(1), Some(Colour::Red));
        assert_eq!(Colour::from_wire(2), None);
        assert_eq!("deep-blue".parse::<Colour>(), Ok(Colour::DeepBlue));
        let err = "green".parse::<Colour>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown colour 'green' (expected one of: red, deep-blue)"
        );
        assert_eq!(
            serde_json::to_string(&Colour::DeepBlue).unwrap(),
            "\"deep-blue\""
        );
        assert_eq!(
            serde_json::from_str::<Colour>("\"red\"").unwrap(),
            Colour::Red
        );
        let e = serde_json::from_str::<Colour>("\"green\"").unwrap_err();
        assert!(e.to_string().contains("unknown colour 'green'"), "{e}");
        let names: Vec<String> = <Colour as clap::ValueEnum>::value_variants()
            .iter()
            .filter_map(clap::ValueEnum::to_possible_value)
            .map(|p| p.get_name().to_string())
            .collect();
        assert_eq!(names, ["red", "deep-blue"]);
    }
}

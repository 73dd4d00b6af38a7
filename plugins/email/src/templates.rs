//! The mail templates, in every language they exist in, and the tiny
//! template language they are written in.
//!
//! Syntax (a subset of Mustache): `{{key}}` is replaced by the context's value
//! (HTML-escaped in the HTML part), a missing key is an error that names it;
//! `{{#key}}…{{/key}}` keeps its body only when `key` is present and not
//! empty, `false`, `0` or `null`. No nesting of the same key, no loops.
//!
//! Every template has an English version; a language without a version of
//! its own falls back to English (`fr` → `en`, `de-AT` → `de`).

use serde_json::{Map, Value};

/// One template in one language.
#[derive(Debug)]
pub struct Template {
    pub subject: &'static str,
    pub text: &'static str,
    /// The body of the HTML part; [`LAYOUT`] wraps it.
    pub html: &'static str,
}

/// The language every template exists in.
pub const FALLBACK: &str = "en";

/// The names `email.send` accepts.
pub const NAMES: &[&str] = &["password_reset", "account_confirmation", "notification", "welcome", "export_ready"];

/// The HTML document around every template's HTML body.
pub const LAYOUT: &str = r#"<!DOCTYPE html>
<html lang="{{lang}}">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width"><title>{{subject}}</title></head>
<body style="margin:0;padding:24px;background:#f4f5f7;font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;color:#1f2328">
<div style="max-width:560px;margin:0 auto;background:#ffffff;border-radius:8px;padding:32px">
{{body}}
</div>
<p style="max-width:560px;margin:16px auto;font-size:12px;color:#6b7280;text-align:center">{{app_name}}</p>
</body>
</html>
"#;

/// `(name, language, template)`.
pub static TEMPLATES: &[(&str, &str, Template)] = &[
    // ------------------------------------------------------------- password_reset
    ("password_reset", "en", Template {
        subject: "Reset your {{app_name}} password",
        text: "Hello {{name}},

someone, hopefully you, asked to reset the password of your {{app_name}} account. Open this link to choose a new one:

{{reset_url}}

{{#expires_hours}}The link is valid for {{expires_hours}} hours. {{/expires_hours}}If you did not ask for this, ignore this email: your password stays as it is.

{{app_name}}
",
        html: r#"<p>Hello {{name}},</p>
<p>someone, hopefully you, asked to reset the password of your {{app_name}} account.</p>
<p><a href="{{reset_url}}" style="display:inline-block;padding:10px 18px;background:#2563eb;color:#ffffff;border-radius:6px;text-decoration:none">Choose a new password</a></p>
<p>{{#expires_hours}}The link is valid for {{expires_hours}} hours. {{/expires_hours}}If you did not ask for this, ignore this email: your password stays as it is.</p>"#,
    }),
    ("password_reset", "de", Template {
        subject: "Ihr {{app_name}}-Passwort zurücksetzen",
        text: "Hallo {{name}},

jemand, hoffentlich Sie, möchte das Passwort Ihres {{app_name}}-Kontos zurücksetzen. Über diesen Link wählen Sie ein neues:

{{reset_url}}

{{#expires_hours}}Der Link ist {{expires_hours}} Stunden gültig. {{/expires_hours}}Wenn Sie das nicht waren, ignorieren Sie diese E-Mail: Ihr Passwort bleibt unverändert.

{{app_name}}
",
        html: r#"<p>Hallo {{name}},</p>
<p>jemand, hoffentlich Sie, möchte das Passwort Ihres {{app_name}}-Kontos zurücksetzen.</p>
<p><a href="{{reset_url}}" style="display:inline-block;padding:10px 18px;background:#2563eb;color:#ffffff;border-radius:6px;text-decoration:none">Neues Passwort wählen</a></p>
<p>{{#expires_hours}}Der Link ist {{expires_hours}} Stunden gültig. {{/expires_hours}}Wenn Sie das nicht waren, ignorieren Sie diese E-Mail: Ihr Passwort bleibt unverändert.</p>"#,
    }),
    // ------------------------------------------------------- account_confirmation
    ("account_confirmation", "en", Template {
        subject: "Confirm your email address for {{app_name}}",
        text: "Hello {{name}},

please confirm that this is your email address by opening this link:

{{confirm_url}}

If you did not create an account, ignore this email.

{{app_name}}
",
        html: r#"<p>Hello {{name}},</p>
<p>please confirm that this is your email address.</p>
<p><a href="{{confirm_url}}" style="display:inline-block;padding:10px 18px;background:#2563eb;color:#ffffff;border-radius:6px;text-decoration:none">Confirm my address</a></p>
<p>If you did not create an account, ignore this email.</p>"#,
    }),
    ("account_confirmation", "de", Template {
        subject: "Bestätigen Sie Ihre E-Mail-Adresse für {{app_name}}",
        text: "Hallo {{name}},

bitte bestätigen Sie über diesen Link, dass dies Ihre E-Mail-Adresse ist:

{{confirm_url}}

Wenn Sie kein Konto angelegt haben, ignorieren Sie diese E-Mail.

{{app_name}}
",
        html: r#"<p>Hallo {{name}},</p>
<p>bitte bestätigen Sie, dass dies Ihre E-Mail-Adresse ist.</p>
<p><a href="{{confirm_url}}" style="display:inline-block;padding:10px 18px;background:#2563eb;color:#ffffff;border-radius:6px;text-decoration:none">Adresse bestätigen</a></p>
<p>Wenn Sie kein Konto angelegt haben, ignorieren Sie diese E-Mail.</p>"#,
    }),
    // ---------------------------------------------------------------- notification
    ("notification", "en", Template {
        subject: "{{title}}",
        text: "Hello {{name}},

{{message}}
{{#url}}
{{url}}
{{/url}}
{{app_name}}
",
        html: r#"<p>Hello {{name}},</p>
<h2 style="font-size:18px">{{title}}</h2>
<p style="white-space:pre-line">{{message}}</p>
{{#url}}<p><a href="{{url}}">{{url}}</a></p>{{/url}}"#,
    }),
    ("notification", "de", Template {
        subject: "{{title}}",
        text: "Hallo {{name}},

{{message}}
{{#url}}
{{url}}
{{/url}}
{{app_name}}
",
        html: r#"<p>Hallo {{name}},</p>
<h2 style="font-size:18px">{{title}}</h2>
<p style="white-space:pre-line">{{message}}</p>
{{#url}}<p><a href="{{url}}">{{url}}</a></p>{{/url}}"#,
    }),
    // --------------------------------------------------------------------- welcome
    ("welcome", "en", Template {
        subject: "Welcome to {{app_name}}, {{name}}",
        text: "Hello {{name}},

welcome to {{app_name}}! Your account is ready.
{{#app_url}}
Sign in at {{app_url}}
{{/app_url}}
{{#support_email}}Questions? Write to {{support_email}}.
{{/support_email}}
{{app_name}}
",
        html: r#"<p>Hello {{name}},</p>
<p>welcome to <strong>{{app_name}}</strong>! Your account is ready.</p>
{{#app_url}}<p><a href="{{app_url}}" style="display:inline-block;padding:10px 18px;background:#2563eb;color:#ffffff;border-radius:6px;text-decoration:none">Sign in</a></p>{{/app_url}}
{{#support_email}}<p>Questions? Write to <a href="mailto:{{support_email}}">{{support_email}}</a>.</p>{{/support_email}}"#,
    }),
    ("welcome", "de", Template {
        subject: "Willkommen bei {{app_name}}, {{name}}",
        text: "Hallo {{name}},

willkommen bei {{app_name}}! Ihr Konto ist eingerichtet.
{{#app_url}}
Anmelden unter {{app_url}}
{{/app_url}}
{{#support_email}}Fragen? Schreiben Sie an {{support_email}}.
{{/support_email}}
{{app_name}}
",
        html: r#"<p>Hallo {{name}},</p>
<p>willkommen bei <strong>{{app_name}}</strong>! Ihr Konto ist eingerichtet.</p>
{{#app_url}}<p><a href="{{app_url}}" style="display:inline-block;padding:10px 18px;background:#2563eb;color:#ffffff;border-radius:6px;text-decoration:none">Anmelden</a></p>{{/app_url}}
{{#support_email}}<p>Fragen? Schreiben Sie an <a href="mailto:{{support_email}}">{{support_email}}</a>.</p>{{/support_email}}"#,
    }),
    // ---------------------------------------------------------------- export_ready
    ("export_ready", "en", Template {
        subject: "Your data export of {{organization}} is ready",
        text: "Hello {{name}},

the export of all data of {{organization}} that you asked for is ready. Download it here:

{{url}}

The link is valid until {{expires_at}}{{#link_ttl_days}} ({{link_ttl_days}} days){{/link_ttl_days}}. Anyone with the link can download the file: do not forward this email.

{{app_name}}
",
        html: r#"<p>Hello {{name}},</p>
<p>the export of all data of <strong>{{organization}}</strong> that you asked for is ready.</p>
<p><a href="{{url}}" style="display:inline-block;padding:10px 18px;background:#2563eb;color:#ffffff;border-radius:6px;text-decoration:none">Download the export</a></p>
<p>The link is valid until {{expires_at}}{{#link_ttl_days}} ({{link_ttl_days}} days){{/link_ttl_days}}. Anyone with the link can download the file: do not forward this email.</p>"#,
    }),
    ("export_ready", "de", Template {
        subject: "Ihr Datenexport von {{organization}} ist fertig",
        text: "Hallo {{name}},

der von Ihnen angeforderte Export aller Daten von {{organization}} ist fertig. Hier können Sie ihn herunterladen:

{{url}}

Der Link ist gültig bis {{expires_at}}{{#link_ttl_days}} ({{link_ttl_days}} Tage){{/link_ttl_days}}. Jeder mit diesem Link kann die Datei herunterladen: Leiten Sie diese E-Mail nicht weiter.

{{app_name}}
",
        html: r#"<p>Hallo {{name}},</p>
<p>der von Ihnen angeforderte Export aller Daten von <strong>{{organization}}</strong> ist fertig.</p>
<p><a href="{{url}}" style="display:inline-block;padding:10px 18px;background:#2563eb;color:#ffffff;border-radius:6px;text-decoration:none">Export herunterladen</a></p>
<p>Der Link ist gültig bis {{expires_at}}{{#link_ttl_days}} ({{link_ttl_days}} Tage){{/link_ttl_days}}. Jeder mit diesem Link kann die Datei herunterladen: Leiten Sie diese E-Mail nicht weiter.</p>"#,
    }),
];

/// The template `name` in `language` (or its primary subtag, or English),
/// with the language actually chosen. `None` for an unknown name.
pub fn find(name: &str, language: &str) -> Option<(&'static str, &'static Template)> {
    let wanted = language.trim().to_ascii_lowercase().replace('_', "-");
    let primary = wanted.split('-').next().unwrap_or_default().to_owned();
    [wanted.as_str(), primary.as_str(), FALLBACK].into_iter().find_map(|lang| {
        TEMPLATES.iter().find(|(n, l, _)| *n == name && *l == lang).map(|(_, l, t)| (*l, t))
    })
}

/// A rendering failure: the template uses a key the context lacks, or is
/// malformed (a section that is never closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderError(pub String);

/// Fills `template` from `context`; HTML-escapes values when `html`.
pub fn render(template: &str, context: &Map<String, Value>, html: bool) -> Result<String, RenderError> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| RenderError("a `{{` is never closed".into()))?;
        let tag = after[..end].trim();
        rest = &after[end + 2..];
        if let Some(key) = tag.strip_prefix('#') {
            let key = key.trim();
            let close = format!("{{{{/{key}}}}}");
            let body_end = rest
                .find(&close)
                .ok_or_else(|| RenderError(format!("section `{key}` is never closed")))?;
            if truthy(context.get(key)) {
                out.push_str(&render(&rest[..body_end], context, html)?);
            }
            rest = &rest[body_end + close.len()..];
        } else if tag.starts_with('/') {
            return Err(RenderError(format!("`{{{{{tag}}}}}` closes no section")));
        } else {
            let value = context
                .get(tag)
                .filter(|v| !v.is_null())
                .ok_or_else(|| RenderError(format!("the template needs `{tag}` in the context")))?;
            let text = display(value);
            if html {
                escape_html_into(&text, &mut out);
            } else {
                out.push_str(&text);
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn truthy(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}

/// A context value as text: strings as they are, anything else as JSON.
fn display(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Escapes `&`, `<`, `>`, `"` and `'`: safe in element text and in quoted
/// attribute values.
pub fn escape_html_into(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// A rendered mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub language: &'static str,
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Renders template `name` in the best language for `language`: subject
/// (one line), text part and the HTML part inside [`LAYOUT`].
pub fn render_mail(name: &str, language: &str, context: &Map<String, Value>) -> Result<Rendered, RenderError> {
    let (lang, t) = find(name, language).ok_or_else(|| {
        RenderError(format!("no template `{name}`; there are: {}", NAMES.join(", ")))
    })?;
    let subject = render(t.subject, context, false)?.replace(['\r', '\n'], " ").trim().to_owned();
    let text = render(t.text, context, false)?;
    let body = render(t.html, context, true)?;
    let mut layout_ctx = context.clone();
    layout_ctx.insert("lang".into(), Value::String(lang.into()));
    layout_ctx.insert("subject".into(), Value::String(subject.clone()));
    layout_ctx.entry("app_name").or_insert_with(|| Value::String(String::new()));
    // The body is already escaped HTML: put it in after rendering the layout.
    layout_ctx.insert("body".into(), Value::String("\u{0}BODY\u{0}".into()));
    let html = render(LAYOUT, &layout_ctx, true)?.replacen("\u{0}BODY\u{0}", &body, 1);
    Ok(Rendered { language: lang, subject, text, html })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ctx(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn every_template_exists_in_english_and_renders_with_its_keys() {
        let full = ctx(json!({
            "name": "Ann", "app_name": "Acme", "app_url": "https://acme.test", "support_email": "help@acme.test",
            "reset_url": "https://acme.test/r/1", "expires_hours": 24, "confirm_url": "https://acme.test/c/1",
            "title": "T", "message": "M", "url": "https://acme.test/x", "organization": "Org",
            "expires_at": "2026-11-29 12:00 UTC", "link_ttl_days": 7,
        }));
        for name in NAMES {
            assert!(TEMPLATES.iter().any(|(n, l, _)| n == name && *l == FALLBACK), "{name} has no English version");
            for (n, lang, _) in TEMPLATES.iter().filter(|(n, ..)| n == name) {
                let r = render_mail(n, lang, &full).unwrap_or_else(|e| panic!("{n}/{lang}: {e:?}"));
                assert_eq!(r.language, *lang);
                assert!(!r.subject.is_empty() && !r.subject.contains('\n'));
                assert!(r.text.contains("Ann") && r.html.contains("Ann"), "{n}/{lang}");
                assert!(r.html.starts_with("<!DOCTYPE html>") && r.html.contains(&format!("lang=\"{lang}\"")));
                assert!(!r.text.contains("{{") && !r.html.contains("{{"), "{n}/{lang} left a tag");
            }
        }
    }

    #[test]
    fn languages_fall_back_to_primary_subtag_then_english() {
        assert_eq!(find("welcome", "de").unwrap().0, "de");
        assert_eq!(find("welcome", "de-AT").unwrap().0, "de");
        assert_eq!(find("welcome", "DE_ch").unwrap().0, "de");
        assert_eq!(find("welcome", "fr").unwrap().0, "en");
        assert_eq!(find("welcome", "").unwrap().0, "en");
        assert!(find("nope", "en").is_none());
    }

    #[test]
    fn values_are_escaped_in_html_only() {
        let c = ctx(json!({"name": "<b>O'Neil & Co</b>", "title": "x", "message": "a<b", "app_name": "A"}));
        let r = render_mail("notification", "en", &c).unwrap();
        assert!(r.text.contains("<b>O'Neil & Co</b>"));
        assert!(r.html.contains("&lt;b&gt;O&#39;Neil &amp; Co&lt;/b&gt;"));
        assert!(!r.html.contains("<b>O'Neil"));
        assert!(r.html.contains("a&lt;b"));
    }

    #[test]
    fn sections_show_only_when_the_key_is_set() {
        let t = "a{{#x}}[{{x}}]{{/x}}b";
        assert_eq!(render(t, &ctx(json!({"x": "1"})), false).unwrap(), "a[1]b");
        for absent in [json!({}), json!({"x": ""}), json!({"x": null}), json!({"x": false}), json!({"x": 0})] {
            assert_eq!(render(t, &ctx(absent), false).unwrap(), "ab");
        }
        assert_eq!(render("{{n}} days", &ctx(json!({"n": 7})), false).unwrap(), "7 days");
    }

    #[test]
    fn missing_keys_and_bad_templates_are_named() {
        let e = render_mail("password_reset", "en", &ctx(json!({"name": "A", "app_name": "X"}))).unwrap_err();
        assert_eq!(e.0, "the template needs `reset_url` in the context");
        assert!(render("{{a", &Map::new(), false).unwrap_err().0.contains("never closed"));
        assert!(render("{{#a}}x", &ctx(json!({"a": 1})), false).unwrap_err().0.contains("section `a`"));
        assert!(render("{{/a}}", &Map::new(), false).unwrap_err().0.contains("closes no section"));
        assert!(render_mail("nope", "en", &Map::new()).unwrap_err().0.contains("no template `nope`"));
    }

    #[test]
    fn subjects_are_one_line_even_with_a_multiline_value() {
        let r = render_mail("notification", "en", &ctx(json!({"name": "A", "title": "a\nb", "message": "m", "app_name": "X"}))).unwrap();
        assert_eq!(r.subject, "a b");
    }
}

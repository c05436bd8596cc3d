//! Where the time goes (`--profile` on `bench` and `train`): a tracing layer that adds up the spans
//! the engine opens (the phases of a step, each layer's forward and backward, and the kernels inside
//! them), each span's time counted without the spans inside it, so that the rows add up to the
//! whole. A kernel span that declares `flops` gets its achieved GFLOP/s, and its share of the FMA
//! peak when that is known.
//!
//! Spans are `trace` level and cost an atomic load when no profiler listens.

use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// Collects span times; clone it to install it as a layer and keep reading it.
#[derive(Clone, Default)]
pub struct Profiler {
    table: Arc<Mutex<HashMap<(&'static str, String), Totals>>>,
}

impl std::fmt::Debug for Profiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profiler").finish_non_exhaustive()
    }
}

#[derive(Default, Clone, Copy)]
struct Totals {
    calls: u64,
    exclusive: Duration,
    inclusive: Duration,
    flops: f64,
}

/// What a span carries from its creation to its exit.
struct Open {
    detail: String,
    flops: f64,
    entered: Option<Instant>,
    /// time spent in spans opened inside this one
    children: Duration,
}

/// The fields a span may declare: `layer` (a layer index), `shape` (which matmul: "IN→OUT"), `flops`.
#[derive(Default)]
struct Fields {
    layer: Option<u64>,
    shape: Option<String>,
    flops: f64,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "layer" => self.layer = Some(value),
            "flops" => self.flops = value as f64,
            _ => {}
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_u64(field, value.max(0) as u64);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "shape" {
            self.shape = Some(value.to_string());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "shape" {
            self.shape = Some(format!("{value:?}"));
        }
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Profiler {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        // a layer's spans are told apart by their index, a matmul's by its shape
        let detail = match (fields.layer, fields.shape) {
            (Some(layer), _) => format!("layer {layer}"),
            (None, Some(shape)) => shape,
            (None, None) => String::new(),
        };
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Open {
                detail,
                flops: fields.flops,
                entered: None,
                children: Duration::ZERO,
            });
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(open) = span.extensions_mut().get_mut::<Open>() {
                open.entered = Some(Instant::now());
            }
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let (key, totals) = {
            let mut extensions = span.extensions_mut();
            let Some(open) = extensions.get_mut::<Open>() else {
                return;
            };
            let Some(entered) = open.entered.take() else {
                return;
            };
            let elapsed = entered.elapsed();
            let totals = Totals {
                calls: 1,
                exclusive: elapsed.saturating_sub(std::mem::take(&mut open.children)),
                inclusive: elapsed,
                flops: open.flops,
            };
            ((span.name(), open.detail.clone()), totals)
        };
        if let Some(parent) = span.parent() {
            if let Some(open) = parent.extensions_mut().get_mut::<Open>() {
                open.children += totals.inclusive;
            }
        }
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let row = table.entry(key).or_default();
        row.calls += totals.calls;
        row.exclusive += totals.exclusive;
        row.inclusive += totals.inclusive;
        row.flops += totals.flops;
    }
}

/// One span name (and detail) over the whole run.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileRow {
    pub span: String,
    /// "layer 3", a matmul's "IN→OUT", or empty
    pub detail: String,
    pub calls: u64,
    /// seconds in this span and not in a span inside it
    pub self_s: f64,
    /// seconds in this span, the spans inside it included
    pub total_s: f64,
    /// share of the profiled time (the sum of every row's `self_s`)
    pub share: f64,
    /// what the span declared it computes, and its rate over `self_s`
    pub gflop: f64,
    pub gflop_per_s: Option<f64>,
    /// `gflop_per_s` over the machine's FMA peak, where that was given
    pub share_of_peak: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub profiled_s: f64,
    pub fma_peak_gflop_per_s: Option<f64>,
    /// by `self_s`, largest first
    pub rows: Vec<ProfileRow>,
}

impl Profiler {
    /// Forgets what was measured so far (the warm-up steps).
    pub fn reset(&self) {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn profile(&self, fma_peak_gflop_per_s: Option<f64>) -> Profile {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let profiled_s: f64 = table.values().map(|t| t.exclusive.as_secs_f64()).sum();
        let mut rows: Vec<ProfileRow> = table
            .iter()
            .map(|((span, detail), t)| {
                let (self_s, total_s) = (t.exclusive.as_secs_f64(), t.inclusive.as_secs_f64());
                // over its own time: a matmul's span holds only its bias add inside it
                let gflop_per_s = (t.flops > 0.0 && self_s > 0.0).then(|| t.flops / 1e9 / self_s);
                ProfileRow {
                    span: span.to_string(),
                    detail: detail.clone(),
                    calls: t.calls,
                    self_s,
                    total_s,
                    share: if profiled_s > 0.0 {
                        self_s / profiled_s
                    } else {
                        0.0
                    },
                    gflop: t.flops / 1e9,
                    gflop_per_s,
                    share_of_peak: gflop_per_s.zip(fma_peak_gflop_per_s).map(|(r, p)| r / p),
                }
            })
            .collect();
        rows.sort_by(|a, b| b.self_s.total_cmp(&a.self_s));
        Profile {
            profiled_s,
            fma_peak_gflop_per_s,
            rows,
        }
    }
}

impl Profile {
    /// The table as text, rows under `min_share` of the time folded into one.
    pub fn table(&self, min_share: f64) -> String {
        let mut out = format!(
            "{:<22} {:<12} {:>7} {:>9} {:>6} {:>9} {:>8} {:>7}\n",
            "span", "detail", "calls", "self s", "share", "total s", "GFLOP/s", "of peak"
        );
        let (shown, folded): (Vec<_>, Vec<_>) =
            self.rows.iter().partition(|r| r.share >= min_share);
        for r in shown {
            let rate = r.gflop_per_s.map_or(String::new(), |g| format!("{g:.1}"));
            let peak = r
                .share_of_peak
                .map_or(String::new(), |s| format!("{:.0} %", 100.0 * s));
            let _ = writeln!(
                out,
                "{:<22} {:<12} {:>7} {:>9.3} {:>5.1}% {:>9.3} {:>8} {:>7}",
                r.span,
                r.detail,
                r.calls,
                r.self_s,
                100.0 * r.share,
                r.total_s,
                rate,
                peak
            );
        }
        if !folded.is_empty() {
            let self_s: f64 = folded.iter().map(|r| r.self_s).sum();
            let _ = writeln!(
                out,
                "{:<22} {:<12} {:>7} {:>9.3} {:>5.1}%",
                format!("({} more)", folded.len()),
                "",
                "",
                self_s,
                100.0 * self_s / self.profiled_s.max(f64::MIN_POSITIVE)
            );
        }
        let matmul: Vec<&ProfileRow> = self.rows.iter().filter(|r| r.gflop > 0.0).collect();
        let (gflop, seconds) = matmul
            .iter()
            .fold((0.0, 0.0), |(g, s), r| (g + r.gflop, s + r.self_s));
        let _ = write!(
            out,
            "profiled {:.3} s; the spans that count FLOPs: {:.1} GFLOP in {:.3} s ({:.0} % of the time), {:.1} GFLOP/s",
            self.profiled_s,
            gflop,
            seconds,
            100.0 * seconds / self.profiled_s.max(f64::MIN_POSITIVE),
            gflop / seconds.max(f64::MIN_POSITIVE)
        );
        if let Some(peak) = self.fma_peak_gflop_per_s {
            let _ = write!(
                out,
                " ({:.0} % of the {peak:.0} GFLOP/s FMA peak)",
                100.0 * gflop / seconds.max(f64::MIN_POSITIVE) / peak
            );
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn spans_add_up_without_counting_time_twice() {
        let profiler = Profiler::default();
        let subscriber = tracing_subscriber::registry().with(profiler.clone());
        tracing::subscriber::with_default(subscriber, || {
            for layer in 0..2u64 {
                let _outer = tracing::trace_span!("forward", layer).entered();
                std::thread::sleep(Duration::from_millis(5));
                let _inner =
                    tracing::trace_span!("matmul", shape = "4→8", flops = 2_000_000_000u64)
                        .entered();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let p = profiler.profile(Some(100.0));
        let row = |span: &str, detail: &str| {
            p.rows
                .iter()
                .find(|r| r.span == span && r.detail == detail)
                .unwrap_or_else(|| panic!("no row {span} {detail}: {:?}", p.rows))
                .clone()
        };
        let matmul = row("matmul", "4→8");
        assert_eq!(matmul.calls, 2);
        assert!(matmul.self_s >= 0.040, "{matmul:?}");
        assert!((matmul.gflop - 4.0).abs() < 1e-9);
        let rate = matmul.gflop_per_s.unwrap();
        assert!(
            (rate - 4.0 / matmul.self_s).abs() < 1e-9 && rate <= 100.0,
            "4 GFLOP in over 40 ms: {rate}"
        );
        assert!((matmul.share_of_peak.unwrap() - rate / 100.0).abs() < 1e-12);
        for layer in ["layer 0", "layer 1"] {
            let outer = row("forward", layer);
            // its own 5 ms, without the 20 ms of the matmul inside it
            assert!(outer.self_s >= 0.005, "{outer:?}");
            assert!(outer.total_s - outer.self_s >= 0.020, "{outer:?}");
        }
        let sum: f64 = p.rows.iter().map(|r| r.share).sum();
        assert!((sum - 1.0).abs() < 1e-9);
        assert!(p.table(0.0).contains("matmul"));
    }
}

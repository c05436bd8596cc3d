//! `softprompt plot`: a run's training loss and dev score against the step, from its
//! `metrics.jsonl`, as a PNG; several runs are overlaid, one colour each. The sweep's report draws
//! its figures with the same functions.

use anyhow::{bail, Context};
use clap::Args;
use plotters::prelude::*;
use softprompt::train::log::{self, Record, METRICS};
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct PlotArgs {
    /// Run directories (each holding metrics.jsonl); several are overlaid.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The PNG to write [default: RUN/curves.png for one run, curves.png for several].
    #[arg(long)]
    output: Option<PathBuf>,
}

pub fn run(args: PlotArgs) -> anyhow::Result<()> {
    let curves = args
        .runs
        .iter()
        .map(|run| Curves::read(run))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let output = match (&args.output, args.runs.as_slice()) {
        (Some(path), _) => path.clone(),
        (None, [one]) => one.join("curves.png"),
        (None, _) => PathBuf::from("curves.png"),
    };
    draw_curves(&curves, &output)?;
    eprintln!("wrote {}", output.display());
    Ok(())
}

/// What one run's log says over its steps.
pub struct Curves {
    pub name: String,
    /// (step, training loss)
    pub loss: Vec<(f64, f64)>,
    /// (step, dev accuracy or exact match)
    pub dev: Vec<(f64, f64)>,
}

impl Curves {
    /// The curves of the run in `dir`, named by the directory.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(METRICS);
        let records = log::read(&path)
            .with_context(|| format!("cannot read the run's log {}", path.display()))?;
        let (mut loss, mut dev) = (Vec::new(), Vec::new());
        for record in records {
            match record {
                Record::Step(r) => loss.push((r.step as f64, r.loss)),
                Record::Eval(r) => dev.push((r.step as f64, r.dev_accuracy)),
            }
        }
        if loss.is_empty() {
            bail!("{} has no training steps", path.display());
        }
        let name = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok(Self { name, loss, dev })
    }
}

/// Steps over which the loss is averaged: a step's loss is one batch's, too noisy to read.
const SMOOTHING: usize = 20;

/// Training loss (a running mean) and dev score against the step, side by side, a colour a run.
pub fn draw_curves(curves: &[Curves], path: &Path) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let smoothed: Vec<Vec<(f64, f64)>> = curves.iter().map(|c| running_mean(&c.loss)).collect();
    let loss: Vec<Series> = curves
        .iter()
        .zip(&smoothed)
        .map(|(c, points)| Series::line(&c.name, points))
        .collect();
    let dev: Vec<Series> = curves
        .iter()
        .map(|c| Series::line(&c.name, &c.dev))
        .collect();
    let caption = format!("training loss (mean of the last {SMOOTHING} steps)");
    chart(&left, &caption, "step", "cross-entropy", &loss, None)?;
    chart(&right, "dev accuracy", "step", "accuracy", &dev, None)?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// One named line of (x, y) points, with an optional ± band per point (a standard deviation).
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64, f64)>,
}

impl<'a> Series<'a> {
    pub fn line(name: &'a str, points: &[(f64, f64)]) -> Self {
        let points = points.iter().map(|&(x, y)| (x, y, 0.0)).collect();
        Self { name, points }
    }
}

/// A line chart with a legend in `area`; each series' points are marked, its ± bands drawn as
/// error bars. With `x_names`, x is an index into them (values that are not numbers).
pub fn chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    x_names: Option<&[String]>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let xs = span(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let ys = span(
        series
            .iter()
            .flat_map(|s| s.points.iter().flat_map(|p| [p.1 - p.2, p.1 + p.2])),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(xs, ys)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_labels(x_names.map_or(10, |n| n.len()))
        .x_label_formatter(&|x| match (x_names, x.fract() == 0.0) {
            (Some(names), true) => names.get(*x as usize).cloned().unwrap_or_default(),
            (Some(_), false) => String::new(),
            (None, true) => format!("{x:.0}"),
            (None, false) => format!("{x}"),
        })
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let line = s.points.iter().map(|p| (p.0, p.1));
        chart
            .draw_series(LineSeries::new(line, colour.stroke_width(2)))?
            .label(s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        if s.points.len() <= 30 {
            let marks = s
                .points
                .iter()
                .map(|p| Circle::new((p.0, p.1), 3, colour.filled()));
            chart.draw_series(marks)?;
        }
        let bands = s.points.iter().filter(|p| p.2 > 0.0);
        chart.draw_series(bands.map(|p| {
            ErrorBar::new_vertical(p.0, p.1 - p.2, p.1, p.1 + p.2, colour.stroke_width(1), 8)
        }))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    Ok(())
}

/// The values' range with a little room on each side (a single value gets some room too).
fn span(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return 0.0..1.0;
    }
    let room = ((hi - lo) * 0.05).max(1e-3);
    lo - room..hi + room
}

/// Each point's y replaced by the mean of the last `SMOOTHING` points' (fewer at the start).
fn running_mean(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= SMOOTHING {
                sum -= points[i - SMOOTHING].1;
            }
            (x, sum / (i + 1).min(SMOOTHING) as f64)
        })
        .collect()
}

/// Where the plots' text comes from: `SOFTPROMPT_FONT`, or DejaVu Sans (Debian's
/// fonts-dejavu-core). Read once; plotters keeps it for the process.
pub fn register_font() -> anyhow::Result<()> {
    static FONT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let registered = FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("SOFTPROMPT_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain([
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into(),
                "/usr/share/fonts/TTF/DejaVuSans.ttf".into(),
                "/usr/share/fonts/dejavu/DejaVuSans.ttf".into(),
            ])
            .collect();
        let Some(bytes) = candidates.iter().find_map(|p| std::fs::read(p).ok()) else {
            return Err(format!(
                "no font to write the plot's text with (looked for {}): install DejaVu Sans (Debian: fonts-dejavu-core) or set SOFTPROMPT_FONT to a .ttf file",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ));
        };
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "the font file is not a TrueType or OpenType font".to_string())
    });
    registered.clone().map_err(anyhow::Error::msg)
}

//! Classification metrics: accuracy, macro-F1, per-class precision and recall, confusion matrix.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ClassMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub examples: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassMetrics>,
    /// confusion[gold][predicted]
    pub confusion: Vec<Vec<usize>>,
    pub labels: Vec<String>,
}

impl Report {
    pub fn new(labels: &[String], gold: &[u32], predicted: &[u32]) -> Self {
        Self::from_confusion(labels, confusion(labels.len(), gold, predicted))
    }

    /// The report of `confusion[gold][predicted]` (counts that add up over parts of a data set).
    pub fn from_confusion(labels: &[String], confusion: Vec<Vec<usize>>) -> Self {
        let c = labels.len();
        let examples = confusion.iter().flatten().sum();
        let correct: usize = (0..c).map(|i| confusion[i][i]).sum();
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let per_class: Vec<ClassMetrics> = (0..c)
            .map(|i| {
                let tp = confusion[i][i];
                let support: usize = confusion[i].iter().sum();
                let predicted_i: usize = (0..c).map(|g| confusion[g][i]).sum();
                let (precision, recall) = (ratio(tp, predicted_i), ratio(tp, support));
                let f1 = if precision + recall == 0.0 {
                    0.0
                } else {
                    2.0 * precision * recall / (precision + recall)
                };
                ClassMetrics {
                    label: labels[i].clone(),
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect();
        let macro_f1 = per_class.iter().map(|m| m.f1).sum::<f64>() / c.max(1) as f64;
        Self {
            examples,
            accuracy: ratio(correct, examples),
            macro_f1,
            per_class,
            confusion,
            labels: labels.to_vec(),
        }
    }
}

/// confusion[gold][predicted] of `classes` labels: how many examples of each gold label got each
/// prediction.
pub fn confusion(classes: usize, gold: &[u32], predicted: &[u32]) -> Vec<Vec<usize>> {
    let mut confusion = vec![vec![0usize; classes]; classes];
    for (&g, &p) in gold.iter().zip(predicted) {
        confusion[g as usize][p as usize] += 1;
    }
    confusion
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "examples  {}", self.examples)?;
        writeln!(f, "accuracy  {:.4}", self.accuracy)?;
        writeln!(f, "macro-F1  {:.4}", self.macro_f1)?;
        let width = self
            .labels
            .iter()
            .map(|l| l.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(f, "\n{:width$}  precision  recall     f1  support", "label")?;
        for m in &self.per_class {
            writeln!(
                f,
                "{:width$}  {:9.4}  {:6.4}  {:5.4}  {:7}",
                m.label, m.precision, m.recall, m.f1, m.support
            )?;
        }
        writeln!(f, "\nconfusion (rows gold, columns predicted)")?;
        write!(f, "{:width$}", "")?;
        for l in &self.labels {
            write!(f, "  {l:>width$}")?;
        }
        writeln!(f)?;
        for (l, row) in self.labels.iter().zip(&self.confusion) {
            write!(f, "{l:width$}")?;
            for n in row {
                write!(f, "  {n:>width$}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_a_known_confusion() {
        let labels = vec!["a".to_string(), "b".to_string()];
        // gold a a a b, predicted a a b b: a → P 1, R 2/3; b → P 1/2, R 1
        let r = Report::new(&labels, &[0, 0, 0, 1], &[0, 0, 1, 1]);
        assert_eq!(r.confusion, vec![vec![2, 1], vec![0, 1]]);
        assert!((r.accuracy - 0.75).abs() < 1e-12);
        let f1_a = 2.0 * (2.0 / 3.0) / (1.0 + 2.0 / 3.0);
        let f1_b = 2.0 * 0.5 / 1.5;
        assert!((r.macro_f1 - (f1_a + f1_b) / 2.0).abs() < 1e-12);
        assert_eq!(r.per_class[1].support, 1);
    }
}

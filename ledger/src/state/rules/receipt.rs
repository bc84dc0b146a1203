//! Query receipts: written by the operator only; each debits its study's budget.

use super::*;

impl State {
    /// Records a query receipt and debits its spend.
    pub(super) fn receipt(&mut self, b: &QueryReceipt, a: &Applying<'_>) -> Result<()> {
        a.need(&[Role::Operator])?;
        let debit = self.check_receipt(b, a.time)?;
        match self.receipts_by_study.get_mut(&b.study) {
            Some(v) => v.push(a.index),
            None => {
                self.receipts_by_study
                    .insert(b.study.clone(), vec![a.index]);
            }
        }
        if let Some((study, dataset, cost)) = debit {
            let key = (study, dataset);
            if b.mode == QueryMode::Extract && b.outcome == Outcome::Released {
                self.extracts
                    .entry(key.clone())
                    .or_insert_with(|| FirstExtract {
                        sql: b.sql.clone(),
                        version: b.version,
                        consent_digest: b.consent_digest.clone(),
                    });
            }
            let spent = self.spent.entry(key.clone()).or_default();
            *spent = spent.plus(&cost);
            let (study, dataset) = key;
            self.released.push(ReceiptRef {
                index: a.index,
                time: a.time,
                study,
                dataset,
            });
        }
        Ok(())
    }

    /// Checks a receipt; for a released or failed (charged) one returns the debit.
    /// Checks a receipt written at `time`. A release needs the study active then (approved, not
    /// suspended or closed, within its approval period): a suspension is in effect from its
    /// entry on, whatever was in flight. A failed receipt only debits a draw already made, so
    /// it is taken whatever the study's status (refusing it would leave the draw uncharged).
    pub(super) fn check_receipt(
        &self,
        b: &QueryReceipt,
        time: Timestamp,
    ) -> Result<Option<(StudyId, DatasetId, Spend)>> {
        if !self.principals.contains_key(&b.researcher) {
            return Err(not_found("principal", &b.researcher));
        }
        check_text("study", &b.study, 128)?;
        if let Some(n) = b.rows_suppressed {
            check_count(n, "rows_suppressed")?;
        }
        check_budget(b.epsilon, "epsilon", false)?;
        check_budget(b.delta, "delta", true)?;
        if let Some(rho) = b.rho {
            // Not compared with epsilon: a receipt's pure parts add rho epsilon_i^2 / 2 each,
            // which no function of their summed epsilon bounds from below.
            check_budget(rho, "rho", false)?;
        }
        match b.outcome {
            Outcome::Denied => {
                if b.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
                    return Err(invalid("a denied receipt gives its reason"));
                }
                if b.epsilon != 0.0
                    || b.delta != 0.0
                    || b.rho.is_some()
                    || b.result_digest.is_some()
                {
                    return Err(invalid(
                        "a denied query spends nothing and releases nothing",
                    ));
                }
                Ok(None)
            }
            Outcome::Released | Outcome::Failed => {
                if b.outcome == Outcome::Failed
                    && (b.reason.as_deref().is_none_or(|r| r.trim().is_empty())
                        || b.result_digest.is_some())
                {
                    return Err(invalid(
                        "a failed receipt gives its reason and releases nothing",
                    ));
                }
                let st = self
                    .studies
                    .get(b.study.as_str())
                    .ok_or_else(|| not_found("study", &b.study))?;
                if b.outcome == Outcome::Released && !st.active_at(time) {
                    return Err(Error::Forbidden(format!(
                        "study {} is not active at this receipt's time (it is {:?}, or outside \
                         its approval period): nothing is released for it",
                        b.study, st.status
                    )));
                }
                let (Some(dataset), Some(version), Some(digest)) =
                    (&b.dataset, b.version, &b.dataset_digest)
                else {
                    return Err(invalid(
                        "a released receipt names the dataset, version and digest",
                    ));
                };
                if b.outcome == Outcome::Released
                    && (b.consent_digest.is_none() || b.result_digest.is_none())
                {
                    return Err(invalid(
                        "a released receipt carries the consent and result digests",
                    ));
                }
                let ds = self
                    .datasets
                    .get(dataset)
                    .ok_or_else(|| not_found("dataset", dataset))?;
                let v = ds
                    .versions
                    .iter()
                    .find(|v| v.reg.version == version)
                    .ok_or_else(|| not_found("dataset version", format!("{dataset}@{version}")))?;
                if v.reg.digest != *digest {
                    return Err(invalid(
                        "dataset_digest does not match the registered version",
                    ));
                }
                if b.mode == QueryMode::Extract
                    && b.outcome == Outcome::Released
                    && let Some(first) = self.extracts.get(&(st.reg.study.clone(), dataset.clone()))
                    && first.sql != b.sql
                {
                    return Err(Error::Forbidden(format!(
                        "study {} already took a different extract of dataset {dataset}; a study \
                         takes one extract of a dataset (repeat its SQL)",
                        b.study
                    )));
                }
                let account = self
                    .account(st.reg.study.as_str(), dataset.as_str())
                    .ok_or_else(|| {
                        Error::Forbidden(format!(
                            "study {} has no approval for dataset {dataset}",
                            b.study
                        ))
                    })?;
                let cost = Spend::of_receipt(b.epsilon, b.delta, b.rho);
                if !account.admits(&cost) {
                    return Err(Error::BudgetExhausted {
                        study: b.study.clone(),
                        dataset: dataset.to_string(),
                        epsilon_left: account.epsilon_left(),
                        delta_left: account.delta_left(),
                    });
                }
                Ok(Some((st.reg.study.clone(), dataset.clone(), cost)))
            }
        }
    }
}

-- Worker slots that seqtune's trials need now. KEDA's postgresql scaler (keda.yaml) runs this
-- query and asks for ceil(slots / slots-per-pod) worker pods (targetQueryValue), and for none
-- when it returns 0. It counts the slots in use as well as the work waiting for one, so that
-- a scale-down never asks for fewer pods than there are trials running:
--   * running studies: their RUNNING trials (held by a worker, or handed back or reaped and
--     waiting to be resumed: lease_owner NULL) plus the budget not started yet
--     (n_trials - n_claimed, which includes the enqueued WAITING trials), the latter within
--     max_concurrent_trials (claims stop at n_running = max_concurrent);
--   * any other study (paused, stopped, timed out): only the trials a worker still holds, which
--     it trains to the end; nothing of theirs is claimed or resumed, so nothing waits;
--   * completed studies: nothing (a study completes once nothing runs).
-- Trials an outside Optuna client runs (owner 'optuna-client') take no worker slot.
-- Cheap enough to poll: the studies' counters, and the RUNNING trials through the trials'
-- (state, lease_renewed_at) index. tests/test_deploy.py runs this file against Postgres.
WITH running_trials AS (
    SELECT
        t.study_id,
        count(*) FILTER (WHERE t.lease_owner IS NOT NULL) AS held,
        count(*) FILTER (WHERE t.lease_owner IS NULL) AS handed_back
    FROM seqtune_trials AS t
    WHERE t.state = 'RUNNING'
      AND t.lease_owner IS DISTINCT FROM 'optuna-client'
    GROUP BY t.study_id
)
SELECT CAST(COALESCE(sum(
    CASE
        WHEN s.status = 'running' THEN
            COALESCE(r.held, 0) + COALESCE(r.handed_back, 0)
            + LEAST(
                GREATEST(s.n_trials - s.n_claimed, 0),
                GREATEST(COALESCE(s.max_concurrent - s.n_running, s.n_trials - s.n_claimed), 0)
            )
        ELSE COALESCE(r.held, 0)
    END
), 0) AS bigint) AS slots_wanted
FROM seqtune_studies AS s
LEFT JOIN running_trials AS r ON r.study_id = s.id
WHERE s.status = 'running' OR r.held > 0

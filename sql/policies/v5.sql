-- Stage 3, v5: pgrec.rerank changes (v4's, one change) and pgrec.list_rows is new; reverting restores v4's
-- rerank and drops list_rows. Same answers.
-- The request's exclude and include_only lists were tested with `= ANY (list)` for every candidate and reserve
-- row: hashed by PostgreSQL while a call is planned with its values, but a scan of the whole list per row once
-- the function's statement switches to its generic plan (plan_cache_mode auto: from the sixth call of a
-- connection on). context.exclude_seen (the batch file's default, an HTTP option) makes the exclude list every
-- item the user ever touched: 10,688 ids for the 100k benchmark's heaviest user. Each row now probes a hashed
-- subplan over pgrec.list_rows(list), whose fixed row estimate (100) keeps the hash in every plan, also for a
-- list too long for the planner to hash had it seen its length.

CREATE OR REPLACE FUNCTION pgrec.list_rows(p_list text[])
RETURNS SETOF text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
ROWS 100
AS $$
BEGIN
    RETURN QUERY SELECT x FROM unnest(p_list) AS x;
END
$$;
COMMENT ON FUNCTION pgrec.list_rows(text[]) IS
    'The elements of a list as rows, with a fixed row estimate (100): pgrec.rerank tests request lists with '
    '`IN (SELECT pgrec.list_rows(list))`, which the planner then always runs as a hash built once per statement.';

CREATE OR REPLACE FUNCTION pgrec.rerank(
    user_key   bigint,
    surface    text,
    k          int,
    item_keys  bigint[],
    scores     float8[],
    sources    text[],
    context    jsonb DEFAULT '{}',
    as_of      timestamptz DEFAULT NULL,
    policy_set text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET max_parallel_workers_per_gather = 0  -- what migrations 0008-0010 pinned with ALTER FUNCTION, now stated here
SET plan_cache_mode = auto
AS $$
#variable_conflict use_variable
DECLARE
    t          timestamptz := coalesce(as_of, now());
    ctx        jsonb := coalesce(context, '{}');
    n_in       int := coalesce(cardinality(item_keys), 0);
    max_k      int;
    excl       text[];
    incl       text[];
    -- the working list: rws holds every row once (the candidates, then the reserve, then rows added on the
    -- way); list and reserve are indices into it, sc the current score of each row
    rws        pgrec.rerank_row[];
    keys       bigint[];
    sc         float8[];
    list       int[];
    reserve    int[] := '{}';
    extra      pgrec.rerank_row[];
    n_rows     int;
    pols       pgrec.policies[];
    active     pgrec.policies[] := '{}';
    pol        pgrec.policies;
    lbl        text;
    dropped    jsonb := '{}';
    skipped    jsonb := '{}';
    versions   jsonb := '[]';
    eff_key    bigint[] := '{}';
    eff_pol    text[] := '{}';
    eff_act    text[] := '{}';
    gone       bigint[] := '{}';
    debug      int;
    steps      jsonb := '[]';
    uprops     jsonb;
    in_holdout boolean := false;
    holdout_control text;
    need_trending boolean := false;
    pin_ids    text[] := '{}';
    ids        text[];
    posn       int[];
    pins       int[];
    pinpos     int[];
    cnt        int;
    mask       boolean[];
    dkeys      bigint[];
    before     int[];
    live       int[];
    new_sc     float8[];
    step_no    int := 0;
    trunc_at   int;
    trunc_len  int;
    hit        bigint[];
    hit_i      int[];
    c_unknown  int;
    c_unavail  int;
    c_excl     int;
    c_incl     int;
    missing    text;
    bad        int;
    acts       text[];
    t_step     timestamptz := clock_timestamp();
    kept_by    text[] := '{}';
    n_i        int;
    ix         int;
    pin_at     int;
    slot_s     float8;
    pinres     boolean[];
    is_drop    boolean;
    pin_only   boolean;
    mul        float8;
    addv       float8;
    min_s      float8;
    hits       int[];
    dead       int[] := '{}';   -- rows dropped by the filters since the list was last cut
    ev_key     bigint[];        -- the user's events before as_of (read once, by the first history filter)
    ev_type    smallint[];
    ev_pol     smallint[];
    ev_at      timestamptz[];
    ev_row     int[];           -- the row of each (event, row) pair above (a key may be two rows: list and reserve)
    -- v3: until the first step that is not a row or history filter, the list is rows 1..n_cand in order and the
    -- reserve rows n_cand + 1..n_rows (`whole`); the filters then mark the rows they drop in isdead (one flag per
    -- row) instead of collecting and cutting index lists
    whole      boolean;
    isdead     boolean[];
    n_cand     int;
    hx         int;
BEGIN
    -- ---- the request
    max_k := coalesce((SELECT (c.value #>> '{}')::int FROM pgrec.config c WHERE c.key = 'policy_max_k'), 1000);
    IF k IS NULL OR k < 1 OR k > max_k THEN
        RAISE EXCEPTION 'pgrec.rerank: k must be between 1 and %, got %', max_k, coalesce(k::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF surface IS NULL OR NOT EXISTS (SELECT 1 FROM pgrec.surfaces s WHERE s.surface = surface) THEN
        RAISE EXCEPTION 'pgrec.rerank: unknown surface %', coalesce(quote_literal(surface), 'NULL')
            USING ERRCODE = '22023', HINT = 'surfaces are the rows of pgrec.surfaces';
    END IF;
    IF coalesce(cardinality(scores), 0) <> n_in OR (sources IS NOT NULL AND cardinality(sources) <> n_in) THEN
        RAISE EXCEPTION 'pgrec.rerank: item_keys (%), scores (%) and sources (%) must have the same length',
            n_in, coalesce(cardinality(scores), 0), coalesce(cardinality(sources)::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF 'NaN'::float8 = ANY (scores) OR array_position(scores, NULL) IS NOT NULL THEN
        SELECT min(o) INTO bad FROM unnest(scores) WITH ORDINALITY x(s, o) WHERE x.s = 'NaN'::float8 OR x.s IS NULL;
        RAISE EXCEPTION 'pgrec.rerank: scores[%] is %', bad, coalesce(scores[bad]::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF jsonb_typeof(ctx) <> 'object' THEN
        RAISE EXCEPTION 'pgrec.rerank: context must be a JSON object' USING ERRCODE = '22023';
    END IF;
    FOREACH lbl IN ARRAY ARRAY['exclude', 'include_only'] LOOP
        IF ctx ? lbl AND jsonb_typeof(ctx -> lbl) <> 'null' AND (jsonb_typeof(ctx -> lbl) <> 'array' OR EXISTS (
               SELECT 1 FROM jsonb_array_elements(ctx -> lbl) e WHERE jsonb_typeof(e) <> 'string')) THEN
            RAISE EXCEPTION 'pgrec.rerank: context.% must be a list of item ids', lbl USING ERRCODE = '22023';
        END IF;
    END LOOP;
    IF ctx ? 'params' AND jsonb_typeof(ctx -> 'params') <> 'object' THEN
        RAISE EXCEPTION 'pgrec.rerank: context.params must be a JSON object' USING ERRCODE = '22023';
    END IF;
    IF ctx ? 'debug' THEN
        IF jsonb_typeof(ctx -> 'debug') <> 'number' THEN
            RAISE EXCEPTION 'pgrec.rerank: context.debug must be a number of items per snapshot' USING ERRCODE = '22023';
        END IF;
        debug := greatest((ctx ->> 'debug')::numeric::int, 1);
    END IF;
    excl := CASE WHEN jsonb_typeof(ctx -> 'exclude') = 'array' THEN ARRAY(SELECT jsonb_array_elements_text(ctx -> 'exclude')) END;
    incl := CASE WHEN jsonb_typeof(ctx -> 'include_only') = 'array'
                 THEN ARRAY(SELECT jsonb_array_elements_text(ctx -> 'include_only')) END;

    -- ---- the policies in force: enabled, surface, time window, policy set; then segment and request params
    SELECT coalesce(array_agg(p ORDER BY p.priority, array_position(pgrec.policy_kinds(), p.kind), p.policy_id), '{}')
      INTO pols
      FROM pgrec.policies p
     WHERE p.enabled
       AND (p.surface IS NULL OR p.surface = surface)
       AND (p.starts_at IS NULL OR p.starts_at <= t)
       AND (p.ends_at IS NULL OR t < p.ends_at)
       AND (p.policy_set IS NULL OR p.policy_set = policy_set);
    FOREACH pol IN ARRAY pols LOOP
        lbl := pol.policy_id || '/' || pol.kind;
        IF pol.segment IS NOT NULL THEN
            IF uprops IS NULL THEN
                uprops := coalesce((SELECT u.properties FROM pgrec.users u WHERE u.user_key = user_key), '{}');
            END IF;
            -- the user as a one-row list: segments use the same predicate language as items
            CONTINUE WHEN NOT (pgrec.policy_match(pol.segment,
                ARRAY[ROW(NULL, NULL, NULL, '', '{}', uprops, NULL)::pgrec.rerank_row], ARRAY[NULL]::float8[],
                ARRAY[1], ctx, t))[1];
        END IF;
        IF strpos(pol.params::text, '"param"') > 0 OR strpos(pol.segment::text, '"param"') > 0 THEN
            missing := pgrec.policy_missing_param(jsonb_build_array(pol.params, pol.segment), ctx);
            IF missing IS NOT NULL THEN
                skipped := skipped || jsonb_build_object(lbl, 'the request has no params.' || missing);
                CONTINUE;
            END IF;
        END IF;
        IF pol.kind = 'holdout' THEN
            -- a stable share of users by hash; no user, no holdout
            CONTINUE WHEN user_key IS NULL OR in_holdout
                OR abs(hashtextextended(coalesce(pol.params ->> 'salt', '') || ':' || user_key::text, 0)) % 10000
                   >= round((pol.params ->> 'percent')::numeric * 100);
            in_holdout := true;
            holdout_control := coalesce(pol.params ->> 'control', 'trending');
            need_trending := need_trending OR holdout_control = 'trending';
        ELSIF pol.kind = 'relevance_floor' AND pol.params ->> 'fill' = 'trending' THEN
            need_trending := true;
        ELSIF pol.kind = 'pin' THEN
            pin_ids := pin_ids || pgrec.policy_pin_ids(pol.params);
        END IF;
        active := active || pol;
    END LOOP;
    in_holdout := false;

    -- ---- the list: known, available items allowed by the request, best score first (ties: item_key); when the
    -- only items from outside the candidates are pins, the same statement reads them (the reserve, by item_key)
    pin_only := NOT need_trending AND cardinality(pin_ids) > 0;
    WITH u AS (
        SELECT DISTINCT ON (x.k) x.k, x.s, x.src
          FROM (SELECT unnest(item_keys) AS k, unnest(scores) AS s, unnest(sources) AS src) x
         WHERE x.k IS NOT NULL
         ORDER BY x.k, x.s DESC NULLS LAST),
    j AS (
        SELECT u.k, u.s, u.src, i.item_key IS NOT NULL AS known, coalesce(i.available, false) AS avail,
               i.item_id, i.categories, i.properties, i.created_at,
               -- (request lists as hashed subplans, built once per statement: header)
               coalesce(i.item_id IN (SELECT pgrec.list_rows(excl)), false) AS ex,
               incl IS NOT NULL AND NOT coalesce(i.item_id IN (SELECT pgrec.list_rows(incl)), false) AS notin,
               false AS res
          FROM u LEFT JOIN pgrec.items i ON i.item_key = u.k
        UNION ALL
        SELECT i.item_key, NULL, '', true, true, i.item_id, i.categories, i.properties, i.created_at, false, false, true
          FROM pgrec.items i
         WHERE pin_only AND i.item_id = ANY (pin_ids) AND i.available
           AND NOT coalesce(i.item_id IN (SELECT pgrec.list_rows(excl)), false)
           AND (incl IS NULL OR i.item_id IN (SELECT pgrec.list_rows(incl)))
         ORDER BY res, s DESC NULLS LAST, k)  -- the aggregates below take the rows in this order (a plain Agg)
    SELECT coalesce(array_agg(ROW(j.k, j.item_id, j.s, coalesce(j.src, ''), j.categories, j.properties,
                                  j.created_at)::pgrec.rerank_row) FILTER (WHERE j.known AND j.avail AND NOT j.ex AND NOT j.notin), '{}'),
           coalesce(array_agg(j.k) FILTER (WHERE j.known AND j.avail AND NOT j.ex AND NOT j.notin), '{}'),
           coalesce(array_agg(j.s) FILTER (WHERE j.known AND j.avail AND NOT j.ex AND NOT j.notin), '{}'),
           count(*) FILTER (WHERE j.known AND j.avail AND NOT j.ex AND NOT j.notin AND NOT j.res),
           count(*) FILTER (WHERE NOT j.known),
           count(*) FILTER (WHERE j.known AND NOT j.avail),
           count(*) FILTER (WHERE j.known AND j.avail AND j.ex),
           count(*) FILTER (WHERE j.known AND j.avail AND NOT j.ex AND j.notin),
           coalesce(array_agg(j.k) FILTER (WHERE NOT (j.known AND j.avail AND NOT j.ex AND NOT j.notin)), '{}')
      INTO rws, keys, sc, n_i, c_unknown, c_unavail, c_excl, c_incl, gone
      FROM j;
    n_rows := cardinality(rws);
    -- the rows are read in list order: best score first (ties: item_key), then the pins' reserve
    list := pgrec.policy_seq(1, n_i);
    reserve := pgrec.policy_seq(n_i + 1, n_rows);
    IF c_unknown > 0 THEN dropped := dropped || jsonb_build_object('unknown', c_unknown); END IF;
    IF c_unavail > 0 THEN dropped := dropped || jsonb_build_object('unavailable', c_unavail); END IF;
    IF c_excl > 0 THEN dropped := dropped || jsonb_build_object('request_exclude', c_excl); END IF;
    IF c_incl > 0 THEN dropped := dropped || jsonb_build_object('request_include_only', c_incl); END IF;
    IF debug IS NOT NULL THEN
        steps := steps || jsonb_build_array(jsonb_build_object('policy', 'input', 'kind', 'input',
            'dropped', c_unknown + c_unavail + c_excl + c_incl, 'items', pgrec.policy_show(rws, sc, list, debug),
            'ms', round(extract(epoch FROM clock_timestamp() - t_step) * 1000, 3)));
        t_step := clock_timestamp();
    END IF;

    -- ---- the reserve: items from outside the candidates (trending fill / holdout control, pins), filtered
    -- by the same policies as the list so that they never bypass a rule
    -- (pins only: read with the list above)
    IF need_trending THEN
        WITH outside AS (
            SELECT tr.item_key, tr.score, 'trending' AS src, 0 AS pref
              FROM pgrec.source_trending(user_key, 2 * k + 20, t) tr
            UNION ALL
            SELECT i.item_key, NULL::float8, '', 1 FROM pgrec.items i WHERE i.item_id = ANY (pin_ids)
        )
        SELECT coalesce(array_agg(ROW(x.item_key, x.item_id, x.score, x.src, x.categories, x.properties,
                                      x.created_at)::pgrec.rerank_row ORDER BY x.score DESC NULLS LAST, x.item_key), '{}'),
               coalesce(array_agg(x.item_key ORDER BY x.score DESC NULLS LAST, x.item_key), '{}'),
               coalesce(array_agg(x.score ORDER BY x.score DESC NULLS LAST, x.item_key), '{}')
          INTO extra, hit, new_sc
          FROM (SELECT DISTINCT ON (o.item_key) o.item_key, i.item_id, o.score, o.src, i.categories, i.properties, i.created_at
                  FROM outside o JOIN pgrec.items i ON i.item_key = o.item_key
                 WHERE i.available AND NOT (i.item_key = ANY (gone))
                   AND NOT coalesce(i.item_id IN (SELECT pgrec.list_rows(excl)), false)
                   AND (incl IS NULL OR i.item_id IN (SELECT pgrec.list_rows(incl)))
                 ORDER BY o.item_key, o.pref) x;
    END IF;
    IF cardinality(extra) > 0 THEN
        reserve := pgrec.policy_seq(n_rows + 1, n_rows + cardinality(extra));
        rws := rws || extra;
        keys := keys || hit;
        sc := sc || new_sc;
        n_rows := n_rows + cardinality(extra);
    END IF;

    n_cand := cardinality(list);
    whole := true;
    isdead := array_fill(false, ARRAY[n_rows]);

    -- ---- the steps at the end that only reorder a known prefix of the list (diversity: depth, mmr: pool,
    -- exploration: depth, pin: its positions) never look further down: from the first of them on, the list is
    -- cut to that prefix (plus the pinned items found below it)
    trunc_len := greatest(k, coalesce(debug, 0));
    FOR n_i IN REVERSE cardinality(active)..1 LOOP
        EXIT WHEN NOT (active[n_i]).kind IN ('diversity', 'mmr', 'exploration', 'pin');
        trunc_at := n_i;
        trunc_len := greatest(trunc_len, CASE (active[n_i]).kind
            WHEN 'diversity' THEN coalesce(((active[n_i]).params ->> 'depth')::int, 100)
            WHEN 'mmr' THEN coalesce(((active[n_i]).params ->> 'pool')::int, greatest(3 * k, 30))
            WHEN 'exploration' THEN coalesce(((active[n_i]).params ->> 'depth')::int, 100)
            ELSE coalesce((SELECT max(x::int) FROM jsonb_array_elements_text((active[n_i]).params -> 'positions') x),
                          cardinality(pgrec.policy_pin_ids((active[n_i]).params))) END);
    END LOOP;
    trunc_len := trunc_len + cardinality(pin_ids);

    -- ---- apply, in order
    FOREACH pol IN ARRAY active LOOP
        lbl := pol.policy_id || '/' || pol.kind;
        step_no := step_no + 1;
        is_drop := pol.kind = ANY (pgrec.policy_drop_kinds());
        IF whole AND NOT (is_drop AND pol.kind <> 'relevance_floor') THEN
            -- the leading filters are done: the rows they left, in order, from the flags
            whole := false;
            list := array_positions(isdead[1:n_cand], false);
            reserve := ARRAY(SELECT n_cand + q FROM unnest(array_positions(isdead[n_cand + 1:n_rows], false)) q);
        END IF;
        IF cardinality(dead) > 0 AND NOT (is_drop AND pol.kind <> 'relevance_floor') THEN
            -- the filters before this step are done: cut what they dropped, once
            list := ARRAY(SELECT x FROM unnest(list) x WHERE x NOT IN (SELECT unnest(dead)));
            reserve := ARRAY(SELECT x FROM unnest(reserve) x WHERE x NOT IN (SELECT unnest(dead)));
            dead := '{}';
        END IF;
        IF step_no = trunc_at AND cardinality(list) > trunc_len THEN
            list := list[1:trunc_len] || ARRAY(SELECT x FROM unnest(list[trunc_len + 1:]) x
                                                WHERE (rws[x]).item_id = ANY (pin_ids));
        END IF;
        -- a holdout user gets the control list with the content filters only (no score floor: other scale)
        IF in_holdout AND (NOT is_drop OR pol.kind = 'relevance_floor') THEN
            skipped := skipped || jsonb_build_object(lbl, 'holdout');
            CONTINUE;
        END IF;
        versions := versions || jsonb_build_array(jsonb_build_object(
            'id', pol.policy_id, 'name', pol.name, 'kind', pol.kind, 'version', pol.version));
        cnt := 0;
        IF is_drop AND pol.kind <> 'relevance_floor' THEN
            -- a filter is per item: one evaluation covers the list and the reserve. What it drops joins `dead`;
            -- the list and the reserve are cut once, before the next step that is not such a filter (the rows
            -- already dead are tested again but not counted again)
            IF whole THEN
                -- rows 1..n_rows are the list and the reserve: the rows to drop, marked once; counted are the
                -- list's rows (<= n_cand) no earlier filter dropped. (No rows at all: nothing runs, as in v2)
                IF n_rows = 0 THEN
                    hits := NULL;
                ELSIF pol.kind IN ('exclude_interacted', 'exclude_negative', 'exclude_served')
                   AND NOT (pol.kind = 'exclude_negative' AND coalesce((pol.params ->> 'neighbours')::boolean, false)) THEN
                    IF ev_key IS NULL THEN
                        SELECT coalesce(array_agg(e.item_key), '{}'), coalesce(array_agg(e.type_id), '{}'),
                               coalesce(array_agg(e.polarity), '{}'), coalesce(array_agg(e.occurred_at), '{}'),
                               coalesce(array_agg(r.i), '{}')
                          INTO ev_key, ev_type, ev_pol, ev_at, ev_row
                          FROM pgrec.events e
                          JOIN (SELECT unnest(keys) AS k, unnest(pgrec.policy_seq(1, cardinality(keys))) AS i) r ON r.k = e.item_key
                         WHERE e.user_key = user_key AND e.occurred_at < t;
                    END IF;
                    hits := pgrec.policy_history_rows(pol.kind, pol.params, ev_row, ev_type, ev_pol, ev_at, keys,
                                                      user_key, t);
                ELSIF pol.kind IN ('exclude_interacted', 'exclude_negative', 'exclude_served') THEN
                    dkeys := pgrec.policy_drop_negative(pol.params, keys, user_key, t);
                    hits := CASE WHEN cardinality(dkeys) > 0 THEN ARRAY(
                        SELECT r.i::int FROM unnest(keys) WITH ORDINALITY r(k, i) JOIN unnest(dkeys) d(k) ON d.k = r.k) END;
                ELSE
                    -- tested: the rows no earlier filter dropped (found in C from the flags)
                    hits := pgrec.policy_drop_hits(pol.kind, pol.params, rws, sc, array_positions(isdead, false),
                                                   ctx, t);
                END IF;
                IF hits IS NOT NULL THEN
                    FOREACH hx IN ARRAY hits LOOP
                        IF NOT isdead[hx] THEN
                            isdead[hx] := true;
                            IF hx <= n_cand THEN
                                cnt := cnt + 1;
                            END IF;
                        END IF;
                    END LOOP;
                    IF cnt > 0 THEN
                        dropped := dropped || jsonb_build_object(lbl, cnt);
                    END IF;
                END IF;
            ELSIF cardinality(list) > 0 OR cardinality(reserve) > 0 THEN
                live := list || reserve;
                hits := NULL;
                IF pol.kind IN ('exclude_interacted', 'exclude_negative', 'exclude_served') THEN
                    IF pol.kind = 'exclude_negative' AND coalesce((pol.params ->> 'neighbours')::boolean, false) THEN
                        dkeys := pgrec.policy_drop_negative(pol.params, keys, user_key, t);
                    ELSE
                        IF ev_key IS NULL THEN
                            -- the user's events before as_of with the items of the request (every row that can
                            -- be listed is in keys by now), once for every history filter of the request
                            SELECT coalesce(array_agg(e.item_key), '{}'), coalesce(array_agg(e.type_id), '{}'),
                                   coalesce(array_agg(e.polarity), '{}'), coalesce(array_agg(e.occurred_at), '{}')
                              INTO ev_key, ev_type, ev_pol, ev_at
                              FROM pgrec.events e
                             WHERE e.user_key = user_key AND e.occurred_at < t
                               AND e.item_key IN (SELECT unnest(keys));
                        END IF;
                        dkeys := pgrec.policy_history_keys(pol.kind, pol.params, ev_key, ev_type, ev_pol, ev_at,
                                                           keys, user_key, t);
                    END IF;
                    IF cardinality(dkeys) > 0 THEN
                        hits := ARRAY(SELECT l.x FROM unnest(live) l(x) JOIN unnest(dkeys) d(k) ON d.k = keys[l.x]);
                    END IF;
                ELSE
                    hits := pgrec.policy_drop_hits(pol.kind, pol.params, rws, sc, live, ctx, t);
                END IF;
                IF cardinality(hits) > 0 AND cardinality(dead) > 0 THEN
                    hits := ARRAY(SELECT h FROM unnest(hits) h WHERE h NOT IN (SELECT unnest(dead)));
                END IF;
                IF cardinality(hits) > 0 THEN
                    dead := dead || hits;
                    -- counted: the items of the list it drops (not the reserve's)
                    cnt := cardinality(hits);
                    IF cardinality(reserve) > 0 THEN
                        cnt := cnt - (SELECT count(*) FROM unnest(hits) h WHERE h = ANY (reserve));
                    END IF;
                    IF cnt > 0 THEN
                        dropped := dropped || jsonb_build_object(lbl, cnt);
                    END IF;
                END IF;
            END IF;
            IF pol.kind = 'attribute_filter' AND coalesce(pol.params ->> 'mode', 'keep') = 'keep' THEN
                -- every item listed in the end passed it (items from outside the candidates too)
                kept_by := kept_by || lbl;
            END IF;
        ELSIF pol.kind = 'relevance_floor' THEN
            -- scored under params.min_score: the list only (the reserve's scores are not on this scale)
            IF cardinality(list) > 0 THEN
                min_s := (pol.params ->> 'min_score')::float8;
                SELECT coalesce(array_agg(f.x) FILTER (WHERE f.d), '{}'), coalesce(array_agg(f.x) FILTER (WHERE NOT f.d), '{}')
                  INTO hit_i, list
                  FROM (SELECT x, coalesce(sc[x] < min_s, true) AS d FROM unnest(list) x OFFSET 0) f;
                cnt := cardinality(hit_i);
                IF cnt > 0 THEN
                    dropped := dropped || jsonb_build_object(lbl, cnt);
                END IF;
            END IF;
            IF pol.params ->> 'fill' = 'trending' AND NOT in_holdout
               AND cardinality(list) < k THEN
                -- fill the short list from trending, below the kept items, at the floor score (new rows: the
                -- reserve keeps its own scores)
                extra := ARRAY(
                    SELECT ROW(r.item_key, r.item_id, (pol.params ->> 'min_score')::float8, r.sources, r.categories,
                               r.properties, r.created_at)::pgrec.rerank_row
                      FROM unnest(reserve) x, LATERAL (SELECT (rws[x]).*) r
                     WHERE r.sources = 'trending' AND NOT (r.item_key = ANY (SELECT keys[q] FROM unnest(list) q))
                     ORDER BY sc[x] DESC, r.item_key
                     LIMIT k - cardinality(list));
                IF cardinality(extra) > 0 THEN
                    list := list || pgrec.policy_seq(n_rows + 1, n_rows + cardinality(extra));
                    rws := rws || extra;
                    hit := ARRAY(SELECT r.item_key FROM unnest(extra) r);
                    keys := keys || hit;
                    sc := sc || ARRAY(SELECT r.score FROM unnest(extra) r);
                    n_rows := n_rows + cardinality(extra);
                    eff_key := eff_key || hit;
                    eff_pol := eff_pol || array_fill(lbl, ARRAY[cardinality(hit)]);
                    eff_act := eff_act || array_fill('filled'::text, ARRAY[cardinality(hit)]);
                END IF;
            END IF;
        ELSIF pol.kind = 'holdout' THEN
            in_holdout := true;
            IF holdout_control = 'trending' AND EXISTS (SELECT 1 FROM unnest(reserve) x WHERE (rws[x]).sources = 'trending') THEN
                list := ARRAY(SELECT x FROM unnest(reserve) x WHERE (rws[x]).sources = 'trending'
                               ORDER BY sc[x] DESC, keys[x]);
            END IF;  -- no trending items (a quiet catalogue): the control is the input order
            hit := ARRAY(SELECT keys[x] FROM unnest(list) x);
            eff_key := eff_key || hit;
            eff_pol := eff_pol || array_fill(lbl, ARRAY[cardinality(hit)]);
            eff_act := eff_act || array_fill('holdout'::text, ARRAY[cardinality(hit)]);
        ELSIF pol.kind = 'boost' THEN
            -- score * multiply + add for the matching items of the list, then re-sort; a negative score (the
            -- ranker's raw scores can be) is divided by multiply instead, so multiply > 1 always raises an item
            -- and < 1 always lowers it (multiply is 0 or at least 1e-6: policy_validate; a row stored under v3's
            -- rules may hold less, which divides as 1e-6); multiply 0 sets every
            -- matching score to add, as before (which raises any score below add)
            mask := pgrec.policy_match(pol.params -> 'predicate', rws, sc, list, ctx, t);
            mul := coalesce((pol.params ->> 'multiply')::float8, 1);
            addv := coalesce((pol.params ->> 'add')::float8, 0);
            -- (the matching positions, in order; a plain aggregate keeps that order)
            SELECT coalesce(array_agg(b.x), '{}'),
                   coalesce(array_agg(keys[b.x]), '{}'),
                   coalesce(array_agg(CASE WHEN b.ns > sc[b.x] THEN 'boosted' ELSE 'buried' END), '{}'),
                   coalesce(array_agg(b.ns), '{}')
              INTO hit_i, hit, acts, new_sc
              FROM (SELECT list[q.o] AS x,
                           CASE WHEN sc[list[q.o]] < 0 AND mul > 0 THEN sc[list[q.o]] / greatest(mul, 1e-6)
                                ELSE sc[list[q.o]] * mul END + addv AS ns
                      FROM unnest(array_positions(mask, true)) q(o) OFFSET 0) b
             WHERE b.ns IS DISTINCT FROM sc[b.x];
            IF cardinality(hit) > 0 THEN
                eff_key := eff_key || hit;
                eff_pol := eff_pol || array_fill(lbl, ARRAY[cardinality(hit)]);
                eff_act := eff_act || acts;
                FOR n_i IN 1..cardinality(hit_i) LOOP
                    sc[hit_i[n_i]] := new_sc[n_i];
                END LOOP;
                list := ARRAY(SELECT x FROM unnest(list) x ORDER BY sc[x] DESC NULLS LAST, keys[x]);
            END IF;
        ELSIF pol.kind = 'pin' THEN
            -- item i at position i of params.positions; items beyond the positions are not pinned; an item
            -- neither in the list nor in the reserve (unavailable, filtered, excluded) leaves its slot to the list
            ids := pgrec.policy_pin_ids(pol.params);
            posn := CASE WHEN pol.params ? 'positions'
                         THEN ARRAY(SELECT x::int FROM jsonb_array_elements_text(pol.params -> 'positions') x)
                         ELSE pgrec.policy_seq(1, cardinality(ids)) END;
            pins := '{}';
            pinpos := '{}';
            pinres := '{}';
            FOR n_i IN 1..least(cardinality(ids), cardinality(posn)) LOOP
                ix := (SELECT x FROM unnest(list) x WHERE (rws[x]).item_id = ids[n_i] LIMIT 1);
                IF ix IS NULL THEN
                    ix := (SELECT x FROM unnest(reserve) x WHERE (rws[x]).item_id = ids[n_i] LIMIT 1);
                    CONTINUE WHEN ix IS NULL OR keys[ix] = ANY (SELECT keys[q] FROM unnest(pins) q);
                    pinres := pinres || true;
                ELSE
                    CONTINUE WHEN keys[ix] = ANY (SELECT keys[q] FROM unnest(pins) q);
                    pinres := pinres || false;
                END IF;
                pins := pins || ix;
                pinpos := pinpos || posn[n_i];
            END LOOP;
            IF cardinality(pins) > 0 THEN
                list := ARRAY(SELECT x FROM unnest(list) x WHERE NOT keys[x] = ANY (SELECT keys[q] FROM unnest(pins) q));
                FOR n_i IN SELECT o FROM unnest(pinpos) WITH ORDINALITY u(pp, o) ORDER BY pp, o LOOP
                    ix := pins[n_i];
                    pin_at := least(pinpos[n_i], coalesce(cardinality(list), 0) + 1);
                    IF sc[ix] IS NULL OR pinres[n_i] THEN
                        -- a new row (the reserve keeps its own); an item without a score (from outside the
                        -- candidates) takes the score of the slot it fills
                        slot_s := sc[ix];
                        IF slot_s IS NULL THEN
                            -- (an empty list: 0)
                            slot_s := coalesce(sc[list[pin_at]], sc[list[pin_at - 1]], 0);
                        END IF;
                        extra := ARRAY[rws[ix]];
                        rws := rws || ROW(extra[1].item_key, extra[1].item_id, slot_s, extra[1].sources,
                                          extra[1].categories, extra[1].properties, extra[1].created_at)::pgrec.rerank_row;
                        keys := keys || keys[ix];
                        sc := sc || slot_s;
                        n_rows := n_rows + 1;
                        ix := n_rows;
                    END IF;
                    list := list[1:pin_at - 1] || ix || list[pin_at:];
                END LOOP;
            END IF;
            -- the pinned items in the top k (also those that happened to stay where they were)
            hit := ARRAY(SELECT keys[x] FROM unnest(list[1:k]) x WHERE (rws[x]).item_id = ANY (ids));
            eff_key := eff_key || hit;
            eff_pol := eff_pol || array_fill(lbl, ARRAY[cardinality(hit)]);
            eff_act := eff_act || array_fill('pinned'::text, ARRAY[cardinality(hit)]);
        ELSE
            before := list;
            list := CASE pol.kind
                WHEN 'source_mix' THEN pgrec.policy_move_source_mix(pol.params, rws, sc, list, ctx, t, k)
                WHEN 'diversity' THEN pgrec.policy_move_diversity(pol.params, rws, sc, list, ctx, t, k)
                WHEN 'mmr' THEN pgrec.policy_move_mmr(pol.params, rws, sc, list, ctx, t, k)
                WHEN 'promote' THEN pgrec.policy_move_promote(pol.params, rws, sc, list, ctx, t, k)
                WHEN 'exploration' THEN pgrec.policy_move_exploration(pol.params, rws, sc, list, ctx, t, k)
                END;
            -- the items this step moved up into or within the top k
            hit := ARRAY(SELECT keys[a.x] FROM unnest(list[1:k]) WITH ORDINALITY a(x, o)
                          WHERE a.o < array_position(before, a.x) ORDER BY a.o);
            eff_key := eff_key || hit;
            eff_pol := eff_pol || array_fill(lbl, ARRAY[cardinality(hit)]);
            eff_act := eff_act || array_fill(CASE pol.kind WHEN 'promote' THEN 'promoted' WHEN 'exploration' THEN 'explored'
                                                           ELSE 'moved' END, ARRAY[cardinality(hit)]);
        END IF;
        IF debug IS NOT NULL THEN
            IF cardinality(dead) > 0 THEN
                list := ARRAY(SELECT x FROM unnest(list) x WHERE x NOT IN (SELECT unnest(dead)));
                reserve := ARRAY(SELECT x FROM unnest(reserve) x WHERE x NOT IN (SELECT unnest(dead)));
                dead := '{}';
            END IF;
            steps := steps || jsonb_build_array(jsonb_build_object('policy', lbl, 'name', pol.name, 'kind', pol.kind,
                'dropped', cnt, 'items', pgrec.policy_show(rws, sc, CASE WHEN whole
                    THEN (array_positions(isdead[1:n_cand], false))[1:debug] ELSE list END, debug),
                'ms', round(extract(epoch FROM clock_timestamp() - t_step) * 1000, 3)));
            t_step := clock_timestamp();
        END IF;
    END LOOP;

    -- ---- the answer: the top k with reasons
    IF whole THEN
        list := array_positions(isdead[1:n_cand], false);
    END IF;
    IF cardinality(dead) > 0 THEN
        list := ARRAY(SELECT x FROM unnest(list) x WHERE x NOT IN (SELECT unnest(dead)));
    END IF;
    list := list[1:k];
    RETURN jsonb_build_object(
        'items', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'item_key', keys[l.x], 'item_id', (rws[l.x]).item_id, 'score', sc[l.x], 'position', l.o,
                       'reasons', jsonb_build_object(
                           'sources', to_jsonb(coalesce(string_to_array(nullif((rws[l.x]).sources, ''), ','), '{}'::text[])),
                           'policies', coalesce(e.pols, '[]'::jsonb) || kb.kept)) ORDER BY l.o)
              FROM unnest(list) WITH ORDINALITY l(x, o)
              CROSS JOIN (SELECT coalesce(jsonb_agg(jsonb_build_object('policy', kb.lbl, 'action', 'kept') ORDER BY kb.n),
                                          '[]'::jsonb) AS kept
                            FROM unnest(kept_by) WITH ORDINALITY kb(lbl, n)) kb
              LEFT JOIN (
                  SELECT x.key, jsonb_agg(jsonb_build_object('policy', x.pol, 'action', x.act) ORDER BY x.n) AS pols
                    FROM unnest(eff_key, eff_pol, eff_act) WITH ORDINALITY x(key, pol, act, n)
                   WHERE x.key IN (SELECT keys[q] FROM unnest(list) q)
                   GROUP BY x.key) e ON e.key = keys[l.x]), '[]'::jsonb),
        'dropped', dropped,
        'policy_versions', versions,
        'skipped', skipped,
        'holdout', in_holdout,
        'steps', CASE WHEN debug IS NOT NULL THEN steps END);
END
$$;
COMMENT ON FUNCTION pgrec.rerank(bigint, text, int, bigint[], float8[], text[], jsonb, timestamptz, text) IS
    'Stage 3: apply the policies in force (surface, segment, time window, policy set) to a scored list, by '
    'priority then kind, and return {"items": [{item_key, item_id, score, position, reasons: {sources, policies}}], '
    '"dropped": {"<policy id>/<kind>": n}, "policy_versions": [...], "skipped": {...}, "holdout": bool}. '
    'context: {"exclude": [item ids], "include_only": [item ids], "params": {...}, "debug": n} (debug: "steps" '
    'holds the first n items and the milliseconds after the input and after each policy). '
    'Deterministic: ties are broken by item_key.';

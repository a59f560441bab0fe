-- Stage 1, candidates v7: clear errors for a request's k and as_of (each function here replaces v4's of the same
-- signature; reverting restores v4's and drops the two new checks). v4 let PostgreSQL answer: an infinite as_of
-- failed with "cannot subtract infinite dates" (pgrec.recommend, pgrec.candidates, the Python path), a k below 1
-- with "LIMIT must not be negative" (pgrec.similar_items, pgrec.trending_items).

CREATE OR REPLACE FUNCTION pgrec.check_as_of(p_fn text, p_as_of timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_as_of IN ('infinity'::timestamptz, '-infinity'::timestamptz) THEN
        RAISE EXCEPTION '%: as_of must be a finite time, got %', p_fn, p_as_of USING ERRCODE = '22023';
    END IF;
    RETURN p_as_of;
END
$$;
COMMENT ON FUNCTION pgrec.check_as_of(text, timestamptz) IS
    'as_of itself (NULL = now) unless it is infinite, which raises naming the function.';

CREATE OR REPLACE FUNCTION pgrec.check_k(p_fn text, p_k int)
RETURNS int
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_k IS NULL OR p_k < 1 OR p_k > 1000 THEN
        RAISE EXCEPTION '%: k must be between 1 and 1000, got %', p_fn, p_k USING ERRCODE = '22023';
    END IF;
    RETURN p_k;
END
$$;
COMMENT ON FUNCTION pgrec.check_k(text, int) IS 'k itself when it is 1 to 1000; else raises naming the function.';

CREATE OR REPLACE FUNCTION pgrec.candidates(
    user_id text, surface text DEFAULT 'default', n int DEFAULT 500, as_of timestamptz DEFAULT NULL,
    categories text[] DEFAULT NULL)
RETURNS TABLE (item_key bigint, item_id text, sources text[],
               ann_score float8, ann_rank int, history_score float8, history_rank int,
               trending_score float8, trending_rank int, fresh_score float8, fresh_rank int,
               popular_score float8, popular_rank int)
LANGUAGE sql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM pgrec.candidates_by_key((SELECT u.user_key FROM pgrec.users u WHERE u.user_id = $1), $2, $3,
                                        pgrec.check_as_of('pgrec.candidates', $4), $5)
$$;
COMMENT ON FUNCTION pgrec.candidates(text, text, int, timestamptz, text[]) IS
    'Stage 1: candidates for a user id (unknown id = a cold user); see pgrec.candidates_by_key.';

CREATE OR REPLACE FUNCTION pgrec.similar_items(item text, k int DEFAULT 20)
RETURNS TABLE (item_key bigint, item_id text, score float8, cooccurrence_score float8, embedding_score float8)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET max_parallel_workers_per_gather = 0
AS $$
#variable_conflict use_column
DECLARE
    ik bigint;
    v  public.vector;
BEGIN
    IF $2 IS NULL OR $2 < 1 OR $2 > 1000 THEN
        RAISE EXCEPTION 'pgrec.similar_items: k must be between 1 and 1000, got %', $2 USING ERRCODE = '22023';
    END IF;
    SELECT i.item_key INTO ik FROM pgrec.items i WHERE i.item_id = $1;
    IF ik IS NULL THEN
        RAISE EXCEPTION 'pgrec.similar_items: unknown item "%"', $1 USING ERRCODE = 'P0002';
    END IF;
    SELECT e.embedding INTO v FROM pgrec.item_embeddings e WHERE e.item_key = ik;
    RETURN QUERY
    WITH co AS (
        SELECT n.neighbor_key AS item_key, n.score::float8 AS sc FROM pgrec.item_neighbors n
         WHERE n.item_key = ik ORDER BY n.rank LIMIT $2
    ), em AS (
        SELECT a.item_key, a.score AS sc FROM pgrec.ann_search(v, $2 + 1, NULL, NULL, '{}', 'similar') a
         WHERE a.item_key <> ik
    )
    SELECT x.item_key, i.item_id, coalesce(x.co, 0) + coalesce(x.em, 0), x.co, x.em
      FROM (SELECT coalesce(co.item_key, em.item_key) AS item_key, co.sc AS co, em.sc AS em
              FROM co FULL JOIN em ON em.item_key = co.item_key) x
      JOIN pgrec.items i ON i.item_key = x.item_key
     WHERE i.available
     ORDER BY 3 DESC, x.item_key
     LIMIT $2;
END
$$;
COMMENT ON FUNCTION pgrec.similar_items(text, int) IS
    'Items like an item: co-occurrence score plus embedding cosine similarity. Unknown item: error P0002.';

CREATE OR REPLACE FUNCTION pgrec.trending_items(segment text DEFAULT NULL, k int DEFAULT 20, as_of timestamptz DEFAULT NULL)
RETURNS TABLE (item_key bigint, item_id text, score float8)
LANGUAGE sql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET max_parallel_workers_per_gather = 0
AS $$
    SELECT d.item_key, i.item_id, d.score
      FROM pgrec.decayed_popularity('trending', coalesce($1, ''), pgrec.check_k('pgrec.trending_items', $2),
                                     pgrec.check_as_of('pgrec.trending_items', $3), NULL) d
      JOIN pgrec.items i ON i.item_key = d.item_key
     ORDER BY d.score DESC, d.item_key
$$;
COMMENT ON FUNCTION pgrec.trending_items(text, int, timestamptz) IS
    'Trending items, globally (segment NULL) or in one segment, by time-decayed positive event weight.';

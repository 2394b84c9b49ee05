defmodule Sembed.PgvectorSqlTest do
  # The SQL the README's Ecto lines rely on, against the PostgreSQL + pgvector that .ci/run starts
  # (no Hex package, so no Postgrex here: psql runs the statements). Vectors come from the NIF: a
  # fusion of the tiny Qwen2 and Jina v3 test models (80-d). For the application's `halfvec(2560)`
  # column each 80-d unit vector is repeated 32 times and scaled by 1/√32: still a unit vector, and
  # every cosine is unchanged, so the 2560-d ranking must be the 80-d one.
  use ExUnit.Case, async: false
  import Sembed.TestHelper

  defp psql_bin do
    case System.get_env("SEMBED_TEST_PSQL") do
      p when p not in [nil, ""] ->
        p

      _ ->
        case required_env("SEMBED_TEST_PYTHON") do
          nil ->
            nil

          py ->
            {out, 0} =
              System.cmd(py, [
                "-W",
                "ignore",
                "-c",
                "import pgserver, os; print(os.path.join(os.path.dirname(pgserver.__file__), 'pginstall', 'bin', 'psql'))"
              ])

            String.trim(out)
        end
    end
  end

  defp psql!(url, sql) do
    file = Path.join(tmp_dir("sql"), "q.sql")
    File.write!(file, sql)

    {out, status} =
      System.cmd(psql_bin(), [url, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-f", file],
        stderr_to_stdout: true
      )

    status == 0 || flunk("psql failed (#{status}): #{out}")
    out |> String.split("\n", trim: true)
  end

  defp literal(v), do: "'[" <> Enum.map_join(v, ",", &Float.to_string/1) <> "]'"

  test "halfvec(2560), its HNSW index and <=> rank as the cosines do" do
    url = required_env("SEMBED_TEST_PG")

    if url == nil or psql_bin() == nil do
      IO.puts("\npgvector SQL test NOT RUN: SEMBED_TEST_PG or SEMBED_TEST_PYTHON is not set")
    else
      {:ok, m} = Sembed.load(qodo: fixture("qwen2-bidir-tiny"), jina: fixture("jina-v3-tiny"))

      docs = [
        "def add(a, b), do: a + b",
        "def hello(name), do: name",
        "SELECT 1",
        "GenServer.call(pid, :ping)",
        "defmodule Repo do use Ecto.Repo end",
        "Enum.map(list, & &1 * 2)"
      ]

      {:ok, dvs} = Sembed.embed(m, docs, input_type: :document)
      {:ok, q} = Sembed.embed(m, "add two numbers", input_type: :query)

      widen = fn v ->
        s = :math.sqrt(32)
        l = Sembed.to_list(v) |> Enum.map(&(&1 / s))
        List.duplicate(l, 32) |> List.flatten()
      end

      table = "ex_snippets_#{System.unique_integer([:positive])}"

      inserts =
        docs
        |> Enum.zip(dvs)
        |> Enum.with_index(1)
        |> Enum.map_join("\n", fn {{_body, v}, id} ->
          "INSERT INTO #{table} (id, embedding) VALUES (#{id}, #{literal(widen.(v))});"
        end)

      psql!(url, """
      CREATE EXTENSION IF NOT EXISTS vector;
      CREATE TABLE #{table} (id bigint PRIMARY KEY, embedding halfvec(2560) NOT NULL);
      #{inserts}
      CREATE INDEX #{table}_embedding ON #{table} USING hnsw (embedding halfvec_cosine_ops);
      """)

      got =
        psql!(url, """
        SET enable_seqscan = off;
        SELECT id FROM #{table} ORDER BY embedding <=> #{literal(widen.(q))}::halfvec(2560) LIMIT 6;
        """)
        |> Enum.map(&String.to_integer/1)

      plan =
        psql!(
          url,
          "SET enable_seqscan = off; EXPLAIN SELECT id FROM #{table} ORDER BY embedding <=> #{literal(widen.(q))}::halfvec(2560) LIMIT 6;"
        )

      assert Enum.any?(plan, &(&1 =~ "#{table}_embedding")),
             "the HNSW index was not used:\n#{Enum.join(plan, "\n")}"

      dot = fn a, b ->
        Enum.zip(Sembed.to_list(a), Sembed.to_list(b)) |> Enum.map(fn {x, y} -> x * y end) |> Enum.sum()
      end

      want = dvs |> Enum.with_index(1) |> Enum.sort_by(fn {v, _} -> -dot.(q, v) end) |> Enum.map(&elem(&1, 1))
      assert got == want
      psql!(url, "DROP TABLE #{table};")
    end
  end
end

defmodule Sembed.SearchTest do
  use ExUnit.Case, async: false
  import Sembed.TestHelper

  @files %{
    "lib/math.ex" => """
    defmodule Math do
      def add(a, b), do: a + b
      def multiply(a, b), do: a * b
    end
    """,
    "lib/http.ex" => """
    defmodule HTTPClient do
      def get(url, headers \\\\ []), do: {:request, :get, url, headers}
    end
    """,
    "src/parse.py" => """
    def parse_json_document(text):
        import json
        return json.loads(text)
    """
  }

  defp repo do
    dir = tmp_dir("repo")

    for {p, body} <- @files,
        do: File.mkdir_p!(Path.dirname(Path.join(dir, p))) && File.write!(Path.join(dir, p), body)

    dir
  end

  # `sembed search --json`'s hit paths, in rank order.
  defp cli_paths(db, query, k, mode \\ "hybrid") do
    out = sembed!(["search", "--db", db, "--json", "-k", "#{k}", "--mode", mode, query])
    Regex.scan(~r/"path":\s*"([^"]+)"/, out) |> Enum.map(&Enum.at(&1, 1))
  end

  test "search an index that `sembed index` built in SQLite, as the CLI does" do
    dir = repo()
    db = Path.join(dir, "index.sqlite")
    model = fixture("bert-tiny")
    sembed!(["index", dir, "--db", db, "-m", model, "-q"])

    {:ok, index} = Sembed.open_index(db)
    assert index.rows >= 3
    assert index.model.dimension == 32

    for query <- ["multiply two numbers", "http get request", "parse json"],
        mode <- [:hybrid, :dense, :lexical] do
      {:ok, hits} = Sembed.search(index, query, k: 5, mode: mode)
      assert Enum.map(hits, & &1.path) == cli_paths(db, query, 5, Atom.to_string(mode))
      assert hits |> Enum.map(& &1.score) |> Enum.sort(:desc) == Enum.map(hits, & &1.score)

      case mode do
        :dense -> assert Enum.all?(hits, &(&1.cosine == &1.score and &1.bm25 == nil))
        :lexical -> assert Enum.all?(hits, &(&1.bm25 == &1.score and &1.cosine == nil))
        :hybrid -> assert Enum.all?(hits, &(&1.cosine != nil or &1.bm25 != nil))
      end
    end

    assert_raise ArgumentError, ~r/:mode/, fn -> Sembed.search(index, "x", mode: :fuzzy) end

    {:ok, [hit | _]} = Sembed.search(index, "add", k: 1, lang: "python")
    assert hit.lang == "python"
    assert hit.path =~ "parse.py"
    # A language no chunk can have is an error naming those there are, not an empty list.
    assert {:error, %Sembed.Error{message: msg}} = Sembed.search(index, "add", lang: "pyhton")
    assert msg =~ "one of rust, python"
    {:ok, hits} = Sembed.search(index, "add", path: "*lib/*")
    assert Enum.all?(hits, &String.contains?(&1.path, "lib/"))

    # With a model already loaded (shared with embedding calls), and by target for one call.
    {:ok, m} = Sembed.load(model)
    {:ok, shared} = Sembed.open_index(db, model: m)
    assert Sembed.search(shared, "parse json", k: 3) == Sembed.search(index, "parse json", k: 3)
    assert {:ok, [_ | _]} = Sembed.search(db, "parse json", k: 2)

    # A different model than the index's is refused, naming both.
    {:ok, other} = Sembed.load(fixture("qwen3-causal-tiny"))
    assert {:error, %Sembed.Error{reason: :index, message: msg}} = Sembed.open_index(db, model: other)
    assert msg =~ "bert-tiny"
  end

  test "a missing index is an error, never a new empty file" do
    path = Path.join(tmp_dir("noindex"), "nothing.sqlite")
    assert {:error, %Sembed.Error{reason: :index, message: msg}} = Sembed.open_index(path)
    assert msg =~ "no such index"
    refute File.exists?(path)
  end

  test "search an index in PostgreSQL (pgvector), as the CLI does" do
    case required_env("SEMBED_TEST_PG") do
      nil ->
        IO.puts("\nPostgreSQL search test NOT RUN: SEMBED_TEST_PG is not set")

      url ->
        dir = repo()
        table = "ex_search_#{System.unique_integer([:positive])}"
        db = "#{url}##{table}"
        sembed!(["index", dir, "--db", db, "-m", fixture("bert-tiny"), "-q"])
        {:ok, index} = Sembed.open_index(db)
        assert index.rows >= 3

        for query <- ["multiply two numbers", "parse json"] do
          {:ok, hits} = Sembed.search(index, query, k: 5)
          assert Enum.map(hits, & &1.path) == cli_paths(db, query, 5)
        end
    end
  end
end

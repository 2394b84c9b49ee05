defmodule Sembed.ReadmeTest do
  # The README's `<!-- tested -->` blocks, run in order in one binding, as a reader would paste
  # them. Two substitutions, said here: "code-search.toml" (the real Qodo ⊕ Jina fusion, whose
  # weights are not reachable where the tests run) becomes a fusion of the tiny Qwen2 and Jina v3
  # test models, and `index_path` is bound to an index built by `sembed index` in this test.
  use ExUnit.Case, async: false
  import Sembed.TestHelper

  test "the README's Elixir lines run" do
    readme = File.read!(Path.expand("../README.md", __DIR__))
    blocks = Regex.scan(~r/<!-- tested -->\n```elixir\n(.*?)```/s, readme) |> Enum.map(&Enum.at(&1, 1))
    assert length(blocks) == 4

    dir = tmp_dir("readme")
    toml = Path.join(dir, "code-search.toml")

    File.write!(toml, """
    [[model]]
    name = "qodo"
    ref = "#{fixture("qwen2-bidir-tiny")}"
    [[model]]
    name = "jina"
    ref = "#{fixture("jina-v3-tiny")}"
    """)

    repo = Path.join(dir, "repo")
    File.mkdir_p!(Path.join(repo, "lib"))
    File.write!(Path.join(repo, "lib/math.ex"), "defmodule Math do\n  def add(a, b), do: a + b\nend\n")

    File.write!(
      Path.join(repo, "lib/greet.ex"),
      "defmodule Greet do\n  def hello(name), do: \"hello \" <> name\nend\n"
    )

    index_path = Path.join(dir, "index.sqlite")
    sembed!(["index", repo, "--db", index_path, "-q"])

    binding =
      Enum.reduce(blocks, [index_path: index_path], fn code, binding ->
        code = String.replace(code, ~s("code-search.toml"), inspect(toml))
        {_, binding} = Code.eval_string(code, binding, file: "README.md")
        binding
      end)

    # What the blocks claim, checked.
    assert binding[:cosine] > 0.3
    assert length(binding[:results]) == 100
    assert Enum.all?(binding[:results], &match?({:ok, <<_::binary-size(80 * 4)>>}, &1))
    assert [_ | _] = binding[:hits]
    assert Enum.all?(binding[:hits], &(&1.lang == "elixir"))
    assert hd(binding[:hits]).path =~ "math.ex"
  end
end

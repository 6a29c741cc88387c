module kvcount

go 1.27

require evrhost.dev/sdk v0.2.0

// `evrhost build` writes the SDK there (and builds with a go.mod of its
// own); this line is for editors.
replace evrhost.dev/sdk => ./.evrhost/go-sdk

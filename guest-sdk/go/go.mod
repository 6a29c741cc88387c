module evrhost.dev/sdk

go 1.27
